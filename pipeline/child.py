"""Run a generator function in a child process with a stall limit, so native code that hangs, crashes or is
killed for memory takes down only the child, never the worker that asked.

`ChildProcess` starts ``python -m pipeline.child`` once and reuses it for call after call; it is
restarted after it was killed or died. The protocol is `multiprocessing.connection` framing (pickle)
over the child's stdin/stdout; the child moves its own stdout to stderr first, so nothing a native
library prints can corrupt the stream. Each call sends ``(function, args, heartbeat_s)``; the child calls
``function(*args, progress=...)`` and answers with ``("item", x)`` per item the generator yields, then
``("done", None)``, or ``("raise", exception)``, which the caller gets as `ChildRaised` (so that it can
tell the child's errors from its own).

**Progress, not output, keeps a call alive.** The function calls ``progress()`` whenever it moves on (the
decoder: every packet read or decoded, every picture decoded); the child sends ``("progress", None)`` at
most every ``heartbeat_s``, a quarter of the stall limit. So the limit means "nothing moved for that
long": a decode that works through an hour of frames between two outputs is not stopped, and one that
hangs inside a native call is.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection


STARTUP_TIMEOUT_S = 120.0  # for the child to import its modules; not counted as a stall
HEARTBEAT_S = 1.0  # the most time between two progress messages of a child that is moving on
MAX_WAIT_S = 1e6  # the longest single wait (a poll longer than ~9.2e9 s overflows)


class ChildFailed(Exception):
    """The child stopped answering (``stalled``), ran past its call's deadline (``timed_out``) or died
    (``exit_code``); what it was doing is lost."""

    def __init__(self, reason: str, stalled: bool, exit_code: int | None, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stalled = stalled
        self.exit_code = exit_code
        self.timed_out = timed_out


class ChildRaised(Exception):
    """The function raised in the child: ``error`` is what it raised (re-created here), or, when that could
    not be sent back, a `RuntimeError` saying what it was. Raised by `ChildProcess.run` so that a caller can
    tell the child's errors from its own."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def _death(exit_code: int) -> str:
    if exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.Signals._value2member_map_ else str(-exit_code)
        cause = " (the kernel's out-of-memory killer sends SIGKILL)" if -exit_code == signal.SIGKILL else ""
        return f"killed by {name}{cause}"
    return f"exited with status {exit_code}"


class ChildProcess:
    """A reusable child process running generator functions (module-level, so they pickle by name).

    Args:
        stall_timeout_s: how long the child may go without sending an item or progress before it is killed
            (the default of each call).
        preload: modules the child imports before it reports ready (and before the stall clock runs), so
            a slow import (torch) is never taken for a hung call.
    """

    def __init__(self, stall_timeout_s: float, preload: tuple[str, ...] = ()) -> None:
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        self.preload = preload
        self._process: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._receive: Connection | None = None

    def _start(self) -> None:
        """Start the child and wait until it has imported ``preload``.

        Raises:
            RuntimeError: it did not report ready within `STARTUP_TIMEOUT_S` (a fault of the machine or
                the installation, not of any input).
        """
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen([sys.executable, "-m", "pipeline.child", *self.preload],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._send = Connection(os.dup(self._process.stdin.fileno()), readable=False)
        self._receive = Connection(os.dup(self._process.stdout.fileno()), writable=False)
        self._process.stdin.close()
        self._process.stdout.close()
        try:
            ready = self._receive.poll(STARTUP_TIMEOUT_S) and self._receive.recv() == ("ready", None)
        except EOFError:  # it closed its end: it is exiting
            ready = False
        if not ready:
            try:
                code = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            state = f"exited with status {code}" if code is not None else f"not ready after {STARTUP_TIMEOUT_S} s"
            raise RuntimeError(f"the decoder process did not start ({state}; its stderr is in the worker's log)")

    def run(self, function: Callable[..., Iterator], *args, stall_timeout_s: float | None = None,
            deadline_s: float | None = None) -> Iterator:
        """Yield what ``function(*args, progress=...)`` yields, computed in the child.

        Args:
            stall_timeout_s: this call's stall limit (default: the process's).
            deadline_s: the most seconds the whole call may take, however much progress it reports (None:
                no limit).

        Raises:
            ChildFailed: the child sent neither an item nor progress for the stall limit, or ran past the
                deadline (it is killed), or died.
            ChildRaised: ``function`` raised in the child (what it raised is its ``error``).
            RuntimeError: the child process could not be started (a fault of the machine or the installation).
        """
        limit = stall_timeout_s or self.stall_timeout_s
        ends = time.monotonic() + deadline_s if deadline_s is not None else None
        if self._process is None or self._process.poll() is not None:
            self.close()
            self._start()
        finished = False
        try:
            try:
                self._send.send((function, args, min(HEARTBEAT_S, limit / 4)))
            except (BrokenPipeError, OSError):
                raise self._failure(stalled=False) from None
            while True:
                left = min(limit, MAX_WAIT_S) if ends is None else min(limit, MAX_WAIT_S, ends - time.monotonic())
                if not self._receive.poll(max(left, 0.0)):
                    if ends is not None and time.monotonic() >= ends:
                        raise self._failure(stalled=False, timed_out=deadline_s)
                    raise self._failure(stalled=True, limit=limit)
                try:
                    kind, payload = self._receive.recv()
                except EOFError:
                    raise self._failure(stalled=False) from None
                except Exception as error:  # noqa: BLE001 - a message of the child's that does not unpickle here
                    raise ChildRaised(RuntimeError(f"a message of the child could not be read: {error}")) from None
                if kind == "progress":
                    continue
                if kind == "item":
                    yield payload
                elif kind == "done":
                    finished = True
                    return
                else:
                    finished = True
                    raise ChildRaised(payload)
        finally:
            if not finished:
                self.close()  # a call left half-way (stalled, died, or its caller stopped early) poisons the child

    def _failure(self, stalled: bool, limit: float = 0.0, timed_out: float | None = None) -> ChildFailed:
        if timed_out is not None:
            self.close()
            return ChildFailed(f"still working after {timed_out:g} s: stopped", False, None, timed_out=True)
        if stalled:
            self.close()
            return ChildFailed(f"no progress for {limit:g} s: stopped as hung", True, None)
        code = self._process.wait()
        self.close()
        return ChildFailed(f"the decoder process {_death(code)}", False, code)

    def close(self) -> None:
        """Kill the child (if it runs) and release its pipes."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None
        for connection in (self._send, self._receive):
            if connection is not None:
                connection.close()
        self._send = self._receive = None

    def __del__(self) -> None:
        self.close()


def _heartbeat(send: Connection, interval_s: float) -> Callable[[], None]:
    """A ``progress()`` that sends ``("progress", None)`` at most every ``interval_s``."""
    last = time.monotonic()

    def progress() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= interval_s:
            send.send(("progress", None))
            last = now

    return progress


def _serve(preload: list[str]) -> None:
    send = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # anything printed to stdout from here on goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    receive = Connection(os.dup(0), writable=False)
    for module in preload:
        importlib.import_module(module)
    send.send(("ready", None))
    while True:
        try:
            function, args, interval_s = receive.recv()
        except EOFError:
            return
        try:
            for item in function(*args, progress=_heartbeat(send, interval_s)):
                send.send(("item", item))
        except Exception as error:  # noqa: BLE001 - the parent decides what the error means
            try:
                send.send(("raise", error))
            except (pickle.PicklingError, TypeError, AttributeError):
                send.send(("raise", RuntimeError(f"{type(error).__name__}: {error}")))
            continue
        send.send(("done", None))


if __name__ == "__main__":
    _serve(sys.argv[1:])
