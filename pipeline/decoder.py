"""The decoder stage (a CPU Ray actor): one input row (`pipeline.plan.input_rows`) → its segment rows, error
rows and plan row, with every failure of the input as its outcome (`pipeline.failures`).

The input is decoded in a child process (`pipeline.child`) that reports progress: native code that hangs,
crashes or is killed takes down only the child. In the child, `decode_input` opens the input, completes
its plan (`pipeline.plan.plan_input`) and decodes the frames any method lacks. Here the frames are gathered
into the plan's fixed segments; a segment row leaves once every frame of its segment that is to be decoded
has been decoded or failed, and says per method which of its frames the method reduces.

Rows (``kind``):

* ``segment``: frames of one fixed segment (``frame_index``..., ``pixels [V, S, S, 3]`` uint8: their views,
  each frame's global view first), ``segment`` (the segment's sampled frames) and ``reduce`` (per method,
  the row's frames it reduces: all it lacks of the segment; a temporal method gets its frames only when the
  whole segment is there, else none).
* ``error``: one method's (``spec``) error row (`pipeline.schema.ERROR_SCHEMA` columns).
* ``plan``: the input's sampled frames (``sampled``), for the run's reconciliation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import pyarrow.fs as pafs

from operators.errors import MediaError, first_line
from operators.frames import FrameRequest, error_row, frame_span, open_input
from operators.preprocess import Preprocessing
from operators.timeline import Progress, no_progress
from pipeline.child import ChildFailed, ChildProcess, ChildRaised
from pipeline.config import EncodeConfig
from pipeline.failures import Failure, grown_limit
from pipeline.inputs import local_file
from pipeline.plan import InputPlan, MethodNeeds, needs_of, plan_input

FRAME_FIELDS = ("frame_index", "timestamp_s", "grid_rows", "grid_cols", "views")


def frame_request(config: EncodeConfig, preprocessing: Preprocessing, path: str, frames=None) -> FrameRequest:
    """What `operators.frames` should make of one input under ``config`` (resolved by
    `EncodeConfig.for_tower`) for a tower that takes ``preprocessing``."""
    return FrameRequest(
        path=path,
        media=config.media,
        sampling=config.sampling(),
        frames=tuple(frames) if frames is not None else None,
        preprocessing=preprocessing,
        anyres=config.anyres,
        pinpoints=config.pinpoint_list() if config.anyres else (),
        max_image_pixels=config.max_image_pixels,
        max_frame_pixels=config.max_frame_pixels,
    )


def decode_input(request: FrameRequest, needs: MethodNeeds, progress: Progress = no_progress) -> Iterator[dict]:
    """In the child: ``{"kind": "plan", "plan": InputPlan, "source_info": {...}}`` once the input is probed,
    then the frame and error rows of the frames any method lacks (`operators.frames.InputSource.rows`); a
    `MediaError` (the input's fault, `pipeline.plan.InputChanged` included) is one whole-input error row."""
    try:
        with open_input(request, progress) as source:
            plan = plan_input(source.sampled, needs, request.path)
            yield {"kind": "plan", "plan": plan, "source_info": source.source_info}
            yield from source.rows(plan.decode)
    except MediaError as error:
        yield error_row(type(error).__name__, error.reason)


class DecodeInputs:
    """Ray actor: input rows → segment, error and plan rows (see the module).

    ``preprocessing`` is the tower's (`EncodeConfig.preprocessing`). ``filesystems``
    (`pipeline.inputs.Listing.filesystems`) open each row's ``path``: the filesystem that listed an input
    opens it, with its options (endpoint, region). One child process per actor does the decoding; it is
    killed when it reports no progress for the input's stall limit, or works on it past its deadline
    (`pipeline.failures.grown_limit`), and restarted for the next input. What the child raises is the
    input's outcome; an error of this actor's own (the child cannot start, a fault of this code) fails the run.
    """

    def __init__(self, config: EncodeConfig, preprocessing: Preprocessing,
                 filesystems: dict[str, pafs.FileSystem]) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.filesystems = filesystems
        self.temporal = [spec.temporal for spec in config.methods()]
        self.child = ChildProcess(config.decode_timeout_s, preload=("pipeline.decoder",))

    def __call__(self, row: dict) -> Iterator[dict]:
        needs = needs_of(row)
        rows = _Rows(row, needs, self.temporal, self.preprocessing.image_size)
        if row["problem"]:  # a name no decoder can open (the listing found out)
            yield from rows.whole(Failure.media("InvalidPath", row["problem"]))
            return
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(local_file(self.filesystems[row["filesystem"]], row["path"]))
            except FileNotFoundError as error:  # listed, then gone: the input's fault
                yield from rows.whole(Failure.media("FileNotFoundError", f"no such file: {error}"))
                return
            except IsADirectoryError as error:
                yield from rows.whole(Failure.media("IsADirectoryError", str(error)))
                return
            except OSError as error:  # the store keeps failing: the network's fault, never the input's
                yield from rows.whole(Failure.read(f"cannot read the input: {first_line(error)}"))
                return
            request = frame_request(self.config, self.preprocessing, path)
            failures = int(row["decoder_failures"])
            items = self.child.run(decode_input, request, needs,
                                   stall_timeout_s=grown_limit(self.config.decode_timeout_s, failures),
                                   deadline_s=grown_limit(self.config.input_timeout_s, failures))
            try:
                for item in items:
                    yield from rows.add(item)
            except ChildFailed as failure:
                kind = "DecoderTimeout" if failure.timed_out else "DecoderStalled" if failure.stalled else "DecoderDied"
                yield from rows.stopped(Failure.decoder(kind, failure.reason, failures))
            except ChildRaised as raised:  # not a media fault: not known to be the input's
                reason = f"the decoder raised {type(raised.error).__name__}: {first_line(raised.error)}"
                yield from rows.stopped(Failure.decoder("DecoderError", reason, failures))

    def __del__(self) -> None:
        self.child.close()


class _Rows:
    """The rows one input gives: segments as their frames arrive, and error rows per method."""

    def __init__(self, row: dict, needs: MethodNeeds, temporal: list[bool], image_size: int) -> None:
        self.row = row
        self.needs = needs
        self.temporal = temporal
        self.image_size = image_size
        self.attempt = int(row["attempt"])
        self.plan: InputPlan | None = None
        self.source_info = ""
        self.lacking: list[set[int]] = []  # per method: the frames it lacks (the plan's)
        self.pending: dict[int, dict] = {}  # segment number → its frames decoded, counts failed and wanted, frames
        self.segment_of: dict[int, int] = {}  # frame to decode → its segment's number
        self.delivered: list[set[int]] = [set() for _ in temporal]  # per method: frames it got in a segment row
        self.failed: set[int] = set()

    def _base(self, kind: str) -> dict:
        """A row of ``kind`` with every field present (Ray builds one block schema for all kinds)."""
        methods = len(self.temporal)
        return {
            "kind": kind, "video_id": self.row["video_id"], "source_path": self.row["source_path"],
            "attempt": self.attempt, **{name: [] for name in FRAME_FIELDS},
            "pixels": np.zeros((0, self.image_size, self.image_size, 3), np.uint8), "source_info": self.source_info,
            "segment": [], "reduce": [[] for _ in range(methods)], "spec": -1, "error_type": "", "error_message": "",
            "error_frames": [], "retryable": False,
            "sampled_frames": len(self.plan.sampled) if self.plan is not None else -1, "sampled": [],
        }

    def _error(self, spec: int, failure: Failure, frames) -> dict:
        return {**self._base("error"), "spec": spec, "error_type": failure.error_type,
                "error_message": failure.message, "error_frames": [int(i) for i in frames],
                "retryable": failure.retryable}

    def whole(self, failure: Failure) -> Iterator[dict]:
        """The input failed before its frames were known: a whole-input row for each method that needs it."""
        for spec, settled in enumerate(self.needs.settled):
            if settled is not None:
                yield self._error(spec, failure, [])

    def add(self, item: dict) -> Iterator[dict]:
        """What one item from the child (`decode_input`) gives."""
        if item["kind"] == "plan":
            self.plan = item["plan"]
            self.lacking = [set(frames.tolist()) for frames in self.plan.lacking]
            self.source_info = json.dumps(item["source_info"])
            wanted = set(self.plan.decode.tolist())
            for number, segment in enumerate(self.plan.segments):
                frames = [int(f) for f in segment if int(f) in wanted]
                if frames:
                    self.pending[number] = {"frames": [], "failed": 0, "wanted": len(frames),
                                            "segment": [int(f) for f in segment]}
                    self.segment_of.update((f, number) for f in frames)
            yield {**self._base("plan"), "sampled": self.plan.sampled.tolist()}
        elif item["kind"] == "frame":
            number = self.segment_of[int(item["frame_index"])]
            self.pending[number]["frames"].append(item)
            yield from self._complete(number)
        elif self.plan is None or not item["failed_frames"]:
            yield from self.whole(Failure.media(item["error_type"], item["error_message"]))
        else:
            frames = [int(i) for i in item["failed_frames"]]
            self.failed.update(frames)
            failure = Failure.media(item["error_type"], item["error_message"])
            for spec, lacking in enumerate(self.lacking):
                mine = [f for f in frames if f in lacking]
                if mine:
                    yield self._error(spec, failure, mine)
            for number in sorted({self.segment_of[f] for f in frames}):
                self.pending[number]["failed"] += sum(self.segment_of[f] == number for f in frames)
                yield from self._complete(number)

    def _complete(self, number: int) -> Iterator[dict]:
        """Segment ``number``'s row once every frame of it to be decoded is decoded or failed."""
        segment = self.pending[number]
        if len(segment["frames"]) + segment["failed"] == segment["wanted"]:
            del self.pending[number]
            yield from self._segment_row(segment, whole=True)

    def _segment_row(self, segment: dict, whole: bool) -> Iterator[dict]:
        """The row of ``segment``'s decoded frames: per method those it lacks (a temporal method: only when the
        segment is ``whole``, i.e. no frame of it is still missing); none when no method reduces a frame."""
        frames = segment["frames"]
        numbers = [int(f["frame_index"]) for f in frames]
        reduce = []
        for lacking, temporal in zip(self.lacking, self.temporal):
            mine = [n for n in numbers if n in lacking] if whole or not temporal else []
            reduce.append(mine)
        used = set().union(*map(set, reduce))
        if not used:
            return
        frames = [f for f in frames if int(f["frame_index"]) in used]  # a part of a segment: not what only temporal methods need
        numbers = [int(f["frame_index"]) for f in frames]
        for spec, mine in enumerate(reduce):
            self.delivered[spec].update(mine)
        yield {
            **self._base("segment"),
            "frame_index": numbers,
            "timestamp_s": [float(f["timestamp_s"]) for f in frames],
            "grid_rows": [int(f["grid_rows"]) for f in frames],
            "grid_cols": [int(f["grid_cols"]) for f in frames],
            "views": [len(f["pixels"]) for f in frames],
            "pixels": np.concatenate([f["pixels"] for f in frames]),  # [V, S, S, 3] uint8, global view first
            "segment": segment["segment"],
            "reduce": reduce,
        }

    def stopped(self, failure: Failure) -> Iterator[dict]:
        """The decoder stopped (stalled, died, raised) before the input was done: what it delivered of
        unfinished segments goes to the per-frame methods; each method gets an error row for the frames it
        lacked and did not get (a temporal method: every frame of a segment it did not get whole)."""
        if self.plan is None:
            yield from self.whole(failure)
            return
        unfinished, self.pending = self.pending, {}
        for segment in unfinished.values():
            if segment["frames"]:
                yield from self._segment_row(segment, whole=False)
        for spec, lacking in enumerate(self.lacking):
            lost = sorted(lacking - self.failed - self.delivered[spec])
            if lost:
                message = f"{frame_span(lost)} not decoded: {failure.message}"
                yield self._error(spec, Failure(failure.error_type, message, failure.retryable), lost)
