"""The decoding child process: results stream back, a hung or killed child is a `ChildFailed` and the next call
gets a fresh one; remote reads are retried a bounded number of times and a missing file is not retried."""

from __future__ import annotations

import io
import logging
import os
import signal
import time

import fsspec
import pyarrow.fs as pafs
import pytest

from pipeline.child import ChildFailed, ChildProcess, ChildRaised
from pipeline.inputs import fetch


def count(n: int, progress):
    for i in range(n):
        yield (i, os.getpid())


def fail_after_one(progress):
    yield "first"
    raise ValueError("bad input 42")


def hang_after_one(progress):
    yield "first"
    time.sleep(3600)


def killed_after_one(progress):
    yield "first"
    os.kill(os.getpid(), signal.SIGKILL)


def slow_but_moving(seconds: float, progress):
    """Works for ``seconds`` between two items, reporting progress all along (a long decode between two
    sampled frames)."""
    yield "first"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
        progress()
    yield "second"


@pytest.fixture
def child():
    process = ChildProcess(stall_timeout_s=3, preload=(__name__,))  # this module, imported before the clock runs
    yield process
    process.close()


def test_items_stream_back_and_the_child_is_reused(child):
    first = list(child.run(count, 3))
    second = list(child.run(count, 2))
    assert [i for i, _ in first] == [0, 1, 2] and [i for i, _ in second] == [0, 1]
    assert {pid for _, pid in first + second} == {first[0][1]} != {os.getpid()}, "one child, not this process"


def test_an_exception_in_the_child_is_raised_here_and_the_child_lives_on(child):
    results = child.run(fail_after_one)
    assert next(results) == "first"
    with pytest.raises(ChildRaised, match="ValueError: bad input 42") as raised:
        next(results)
    assert isinstance(raised.value.error, ValueError), "the caller tells the child's errors from its own"
    (_, pid), = list(child.run(count, 1))
    assert list(child.run(count, 1)) == [(0, pid)], "the same child serves the next call"


def test_a_hung_child_is_stopped_within_the_limit_and_replaced(child):
    results = child.run(hang_after_one)
    assert next(results) == "first"
    started = time.monotonic()
    with pytest.raises(ChildFailed) as caught:
        next(results)
    assert 2.5 < time.monotonic() - started < 10
    assert caught.value.stalled and "no progress for 3 s" in caught.value.reason
    assert [i for i, _ in child.run(count, 2)] == [0, 1], "a fresh child serves the next call"


def test_a_call_past_its_deadline_is_stopped_however_much_progress_it_reports(child):
    """An endless stream keeps reporting progress: the call's deadline stops it all the same."""
    started = time.monotonic()
    with pytest.raises(ChildFailed, match="still working after 2 s: stopped") as caught:
        list(child.run(slow_but_moving, 60.0, stall_timeout_s=1.0, deadline_s=2.0))
    assert caught.value.timed_out and not caught.value.stalled and time.monotonic() - started < 10
    assert [i for i, _ in child.run(count, 1)] == [0], "a fresh child serves the next call"


def test_a_child_that_cannot_start_is_the_callers_error_not_a_call_outcome():
    """A decoder process that exits at once (a broken installation) is a RuntimeError of the caller's
    side, saying how it exited, never a ChildFailed or ChildRaised that would be charged to an input."""
    process = ChildProcess(stall_timeout_s=3, preload=("no_such_module_anywhere",))
    try:
        with pytest.raises(RuntimeError, match=r"did not start \(exited with status 1"):
            list(process.run(count, 1))
    finally:
        process.close()


def test_progress_keeps_a_slow_call_alive_and_a_silent_one_is_stopped(child):
    """The limit is on progress, not on items: 4 s of work between two items under a 1 s limit passes when the
    work reports progress; a call that reports nothing is stopped after the limit. Each call may set its own."""
    assert list(child.run(slow_but_moving, 4.0, stall_timeout_s=1.0)) == ["first", "second"]
    started = time.monotonic()
    with pytest.raises(ChildFailed, match="no progress for 1 s"):
        list(child.run(hang_after_one, stall_timeout_s=1.0))
    assert time.monotonic() - started < 5


def test_a_killed_child_is_reported_with_its_signal_and_replaced(child):
    results = child.run(killed_after_one)
    assert next(results) == "first"
    with pytest.raises(ChildFailed) as caught:
        next(results)
    assert not caught.value.stalled and caught.value.exit_code == -signal.SIGKILL
    assert "killed by SIGKILL" in caught.value.reason and "out-of-memory" in caught.value.reason
    assert [i for i, _ in child.run(count, 1)] == [0]


def test_a_caller_that_stops_early_does_not_leave_a_busy_child(child):
    results = child.run(count, 1000)
    next(results)
    results.close()  # the child may still be sending: it is replaced, never reused half-way
    assert [i for i, _ in child.run(count, 3)] == [0, 1, 2]


class FlakyLocal(pafs.FSSpecHandler):
    """A local filesystem whose first ``failures`` reads fail as a network read would."""

    def __init__(self, failures: int) -> None:
        super().__init__(fsspec.filesystem("file"))
        self.failures = failures

    def open_input_stream(self, path):
        if self.failures:
            self.failures -= 1
            raise OSError("connection reset by peer")
        return super().open_input_stream(path)


def test_remote_reads_are_retried_then_fail_loudly(tmp_path, caplog):
    source = tmp_path / "clip.mp4"
    source.write_bytes(b"video bytes" * 1000)
    copy = io.BytesIO()
    with caplog.at_level(logging.WARNING):
        fetch(pafs.PyFileSystem(FlakyLocal(failures=2)), str(source), copy, attempts=3, backoff_s=0.01)
    assert copy.getvalue() == source.read_bytes()
    assert sum("connection reset by peer" in r.message for r in caplog.records) == 2

    with pytest.raises(OSError, match="connection reset by peer"):
        fetch(pafs.PyFileSystem(FlakyLocal(failures=3)), str(source), io.BytesIO(), attempts=3, backoff_s=0.01)
    with pytest.raises(FileNotFoundError):
        fetch(pafs.PyFileSystem(FlakyLocal(failures=0)), str(tmp_path / "missing.mp4"), io.BytesIO(), attempts=3)


def test_preloaded_modules_do_not_count_against_the_stall_limit():
    """The child imports torch (slow on a busy machine) before it reports ready; the first call's clock
    starts only then."""
    process = ChildProcess(stall_timeout_s=0.5, preload=("torch", "operators.frames"))
    try:
        assert [i for i, _ in process.run(count, 2)] == [0, 1]
    finally:
        process.close()
