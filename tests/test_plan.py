"""Planning and accounting without Ray or media: the sampling grid's fixed segments, what each method lacks, the
error table as it stands after retries, the decoder stage's segment rows and error rows per method, and the
per-frame reconciliation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.decoder import _Rows
from pipeline.failures import MAX_DECODER_FAILURES, Failure, grown_limit
from pipeline.index import INDEX_SCHEMA
from pipeline.inputs import InputItem
from pipeline.plan import InputChanged, MethodNeeds, input_rows, needs_of, plan_input
from pipeline.schema import ERROR_SCHEMA
from pipeline.state import OutputState
from pipeline.summary import reconcile

SAMPLED = np.array([0, 10, 20, 30, 40, 50, 60])


def entries(*rows: tuple[str, list[int], int]) -> pa.Table:
    """Index entries: (video id, committed frames, attempt), one shard each, 7 frames sampled."""
    return pa.Table.from_pylist([{"video_id": video_id, "file": f"part-{i}.parquet", "file_bytes": 1,
                                  "row_groups": [0], "frame_indices": frames, "rows": len(frames), "tokens": 1,
                                  "sampled_frames": 7, "attempt": attempt}
                                 for i, (video_id, frames, attempt) in enumerate(rows)], schema=INDEX_SCHEMA)


def errors(*rows: tuple[str, str, list[int], bool, int]) -> pa.Table:
    """Error rows: (video id, error type, frames, retryable, attempt)."""
    return pa.Table.from_pylist([{"video_id": video_id, "source_path": f"/{video_id}.mp4", "error_type": kind,
                                  "error_message": "m", "frame_indices": frames, "retryable": retryable,
                                  "attempt": attempt, "sampled_frames": 7 if frames else None}
                                 for video_id, kind, frames, retryable, attempt in rows], schema=ERROR_SCHEMA)


def test_segments_are_fixed_on_the_sampling_grid_and_each_method_lacks_its_own():
    needs = MethodNeeds(settled=((0, 10), None, (30, 40, 50, 60)), recorded_sampled=7, segment_size=3)
    plan = plan_input(SAMPLED, needs, "/v.mp4")
    assert [s.tolist() for s in plan.segments] == [[0, 10, 20], [30, 40, 50], [60]]
    assert [frames.tolist() for frames in plan.lacking] == [[20, 30, 40, 50, 60], [], [0, 10, 20]]
    assert plan.decode.tolist() == [0, 10, 20, 30, 40, 50, 60]
    settled_elsewhere = plan_input(SAMPLED, MethodNeeds(((0, 10),), None, 3), "/v.mp4")
    assert [s.tolist() for s in settled_elsewhere.segments] == [s.tolist() for s in plan.segments], \
        "segments do not depend on what earlier runs settled"


def test_an_input_whose_sampling_changed_is_refused():
    with pytest.raises(InputChanged, match="now selects 7 frames where an earlier run recorded 8"):
        plan_input(SAMPLED, MethodNeeds(((),), 8, 1), "/v.mp4")
    with pytest.raises(InputChanged, match=r"frames \[15\] that an earlier run recorded are no longer among"):
        plan_input(SAMPLED, MethodNeeds(((0, 15),), None, 1), "/v.mp4")


def test_the_error_table_as_it_stands_after_retries():
    """A retryable row is stale once a later try of its input made anything; rows name only frames not in
    the shards; permanent rows stay; a whole-input row stands for every frame not in the shards."""
    state = OutputState(
        entries(("a", [0, 10, 20], 1), ("a", [30, 40], 2), ("b", [0], 1), ("d", [0, 10], 3)),
        errors(("a", "DecoderDied", [30, 40, 50, 60], True, 1),  # try 2 committed 30, 40 and failed 50, 60 again
               ("a", "DecoderStalled", [50, 60], True, 2),
               ("b", "FrameDecodeError", [10, 20], False, 1),  # for good
               ("b", "DecoderDied", [30, 40, 50, 60], True, 1),  # the latest try: still current
               ("c", "DecoderStalled", [], True, 1), ("c", "DecoderError", [], True, 2),  # whole input, twice
               ("d", "InputReadError", [], True, 2)))  # try 3 committed frames: stale
    current = sorted((r["video_id"], r["attempt"], r["frame_indices"]) for r in state.current_errors().to_pylist())
    assert current == [("a", 2, [50, 60]), ("b", 1, [10, 20]), ("b", 1, [30, 40, 50, 60]), ("c", 2, [])]
    assert state.errors["a"].retryable == {50, 60} and state.errors["a"].decoder_failures == {1, 2}
    assert state.errors["b"].permanent == {10, 20} and state.errors["b"].retryable == {30, 40, 50, 60}
    assert state.errors["c"].whole == "retryable" and state.errors["c"].decoder_failures == {1, 2}
    assert "d" not in {r["video_id"] for r in state.current_errors().to_pylist()}
    assert state.attempt == {"a": 2, "b": 1, "c": 2, "d": 3}
    assert state.settled("b") == {0, 10, 20} and not state.finished("b")
    finished = OutputState(entries(("e", [0, 10, 20, 30, 40], 1)), errors(("e", "FrameDecodeError", [50, 60], False, 1)))
    assert finished.finished("e") and finished.settled("e") == set(SAMPLED.tolist())
    whole = OutputState(entries(), errors(("f", "VideoDecodeError", [], False, 1)))
    assert whole.finished("f") and whole.errors["f"].whole == "permanent"


def test_input_rows_carry_each_methods_needs_the_try_and_the_decoder_failures():
    per_frame = OutputState(entries(("a", [0, 10, 20, 30, 40, 50, 60], 1), ("b", [0], 1)),
                            errors(("b", "DecoderDied", [10, 20, 30, 40, 50, 60], True, 1)))
    temporal = OutputState(entries(("b", [0, 10, 20], 1)), errors(("a", "DecoderStalled", [], True, 2),
                                                                  ("b", "DecoderDied", [30, 40, 50, 60], True, 1)))
    items = [InputItem(video_id, f"/{video_id}.mp4", f"/{video_id}.mp4") for video_id in ("a", "b", "new")]
    rows = {row["video_id"]: row for row in input_rows(items, [per_frame, temporal], 3)}
    assert rows["a"]["finished"] == [True, False] and rows["a"]["attempt"] == 3
    assert (rows["a"]["decoder_failures"], rows["b"]["decoder_failures"]) == (1, 1)
    assert rows["b"]["settled"] == [[0], [0, 10, 20]] and rows["b"]["attempt"] == 2
    assert rows["new"] == {**rows["new"], "finished": [False, False], "settled": [[], []], "recorded_sampled": -1,
                           "attempt": 1, "decoder_failures": 0}
    assert needs_of(rows["a"]) == MethodNeeds((None, ()), 7, 3)
    assert grown_limit(300, rows["b"]["decoder_failures"]) == 600


def test_the_last_decoder_failure_allowed_is_for_good():
    assert Failure.decoder("DecoderDied", "killed", 0).retryable
    last = Failure.decoder("DecoderDied", "killed", MAX_DECODER_FAILURES - 1)
    assert not last.retryable and f"decoder failure {MAX_DECODER_FAILURES} of {MAX_DECODER_FAILURES}" in last.message
    assert Failure.read("unreachable").retryable


def frame(number: int) -> dict:
    return {"kind": "frame", "frame_index": number, "timestamp_s": number / 10, "grid_rows": 1, "grid_cols": 1,
            "pixels": np.full((1, 4, 4, 3), number, np.uint8)}


def decoder_rows(settled, temporal, attempt=1):
    row = {"video_id": "v", "source_path": "/v.mp4", "attempt": attempt, "finished": [s is None for s in settled],
           "settled": [s or [] for s in settled], "recorded_sampled": -1, "segment_size": 3, "decoder_failures": 0}
    return _Rows(row, needs_of(row), temporal, 4)


def test_segment_rows_leave_whole_and_each_method_gets_what_it_lacks():
    """A per-frame method lacking everything and a temporal one lacking the second segment: a segment row
    leaves once its frames are decoded or failed; a frame failed for good is each lacking method's error row
    and splits nothing it does not hold."""
    rows = decoder_rows([[], [0, 10, 20, 60]], [False, True])
    needs = needs_of(rows.row)
    plan = plan_input(SAMPLED, needs, "/v.mp4")
    out = list(rows.add({"kind": "plan", "plan": plan, "source_info": {"sampled_frames": 7}}))
    assert [r["kind"] for r in out] == ["plan"] and out[0]["sampled"] == SAMPLED.tolist()
    segments = []
    for item in [frame(0), frame(10), frame(20), frame(30),
                 {"kind": "error", "error_type": "FrameDecodeError", "error_message": "frame 40: bad",
                  "failed_frames": [40]}, frame(50), frame(60)]:
        for row in rows.add(item):
            segments.append(row)
    errors_ = [r for r in segments if r["kind"] == "error"]
    assert [(r["spec"], r["error_frames"], r["retryable"]) for r in errors_] == [(0, [40], False), (1, [40], False)]
    made = [(r["frame_index"], r["reduce"], r["segment"]) for r in segments if r["kind"] == "segment"]
    assert made == [([0, 10, 20], [[0, 10, 20], []], [0, 10, 20]),
                    ([30, 50], [[30, 50], [30, 50]], [30, 40, 50]),
                    ([60], [[60], []], [60])]
    assert segments[-1]["pixels"].shape == (1, 4, 4, 3)


def test_a_decoder_that_stops_mid_input_gives_per_frame_methods_what_was_decoded():
    """Stopped after frames 0, 10, 20, 30: the per-frame method keeps all four and gets a retryable row for
    the rest; the temporal method keeps its whole first segment and gets every frame of the unfinished
    segments, 30 included, as retryable."""
    rows = decoder_rows([[], []], [False, True], attempt=2)
    plan = plan_input(SAMPLED, needs_of(rows.row), "/v.mp4")
    made = list(rows.add({"kind": "plan", "plan": plan, "source_info": {}}))
    for number in (0, 10, 20, 30):
        made += list(rows.add(frame(number)))
    made += list(rows.stopped(Failure.decoder("DecoderDied", "killed by SIGKILL", 0)))
    units = [(r["frame_index"], r["reduce"]) for r in made if r["kind"] == "segment"]
    assert units == [([0, 10, 20], [[0, 10, 20], [0, 10, 20]]), ([30], [[30], []])]
    failed = [(r["spec"], r["error_frames"], r["retryable"], r["attempt"]) for r in made if r["kind"] == "error"]
    assert failed == [(0, [40, 50, 60], True, 2), (1, [30, 40, 50, 60], True, 2)]
    assert all("not decoded: killed by SIGKILL (decoder failure 1 of 3" in r["error_message"]
               for r in made if r["kind"] == "error")


def test_a_decoder_that_stops_before_the_plan_is_a_whole_input_row_for_each_method_in_need():
    rows = decoder_rows([[], None], [False, False])
    [row] = list(rows.stopped(Failure.decoder("DecoderStalled", "no progress for 300 s", 0)))
    assert (row["spec"], row["error_frames"], row["retryable"], row["sampled_frames"]) == (0, [], True, -1)


def test_reconciliation_names_planned_frames_that_ended_nowhere():
    """Frames the run planned must be in the shards or in an error row of this try; a row of an earlier try
    does not count; an input without a plan needs a whole-input row of this try."""
    rows = [{"video_id": video_id, "source_path": f"/{video_id}.mp4", "attempt": 2, "finished": [False],
             "settled": [[0]]} for video_id in ("ok", "lost", "old", "whole", "nothing")]
    plans = {video_id: SAMPLED.tolist() for video_id in ("ok", "lost", "old")}
    state = OutputState(
        entries(("ok", [0, 10, 20, 30, 40], 2), ("lost", [0, 10, 20, 30, 40], 2), ("old", [0], 1)),
        errors(("ok", "FrameDecodeError", [50, 60], False, 2), ("lost", "FrameDecodeError", [50], False, 2),
               ("old", "DecoderDied", [10, 20, 30, 40, 50, 60], True, 1), ("whole", "VideoDecodeError", [], False, 2)))
    unaccounted = reconcile(rows, plans, [state], ["prumerge"])
    assert unaccounted == {"lost": ["/lost.mp4 (prumerge): frame 60"],
                           "old": ["/old.mp4 (prumerge): frames 10-60 (6 sampled)"],
                           "nothing": ["/nothing.mp4 (prumerge): the whole input (no plan and no error row)"]}
