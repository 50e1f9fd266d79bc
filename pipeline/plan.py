"""Where every frame of a run is planned: per input its sampled frames, fixed segments, and per method the
frames that method lacks.

* **The sampling grid.** An input's sampled frames (`operators.sampling`, a pure function of its timeline
  and the run's sampling) are cut into fixed *segments* of ``segment_size`` consecutive sampled frames
  (`pipeline.config.EncodeConfig.segment_size`: ``--segment-frames`` when a method reduces across frames,
  else 1). Segments depend on nothing else: not on what earlier runs committed, not on the other methods of
  the run. A temporal method (HoliTom) reduces each segment's frames together and commits a segment whole
  (one unit), so its windows are the same whichever run makes them.
* **What each method lacks** is every sampled frame its output holds neither in its shards nor in an error
  row that is for good (`pipeline.state.OutputState.settled`). The decoder decodes the union over the
  methods, once; the encoder reduces for each method what it lacks.
* **Once, where the facts are.** The driver knows what each output holds (`input_rows`); the sampled frames
  are known once the input is probed, so the decoder completes the plan (`plan_input`), checks it against
  what earlier runs recorded (`InputChanged`), and sends it on with the frames: the run's reconciliation
  (`pipeline.summary`) checks every planned (input, method, frame) against the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.errors import MediaError
from pipeline.inputs import InputItem
from pipeline.state import OutputState


class InputChanged(MediaError):
    """The input's sampled frames are not those an earlier run recorded for it (the file was replaced)."""


@dataclass(frozen=True)
class MethodNeeds:
    """What the driver knows one input needs, sent to its decoder: per method the frames already settled
    (None: the method needs nothing of the input), and the sampled-frame count an earlier run recorded."""

    settled: tuple[tuple[int, ...] | None, ...]
    recorded_sampled: int | None
    segment_size: int


@dataclass(frozen=True)
class InputPlan:
    """One input's plan: ``sampled [n]`` int64 frame numbers (increasing), its fixed ``segments`` (each an
    array of consecutive sampled frames), and per method the frames it ``lacking`` (sorted)."""

    sampled: np.ndarray
    segments: list[np.ndarray]
    lacking: list[np.ndarray]

    @property
    def decode(self) -> np.ndarray:
        """``[k]`` int64: the frames any method lacks, increasing: what the decoder decodes."""
        return np.unique(np.concatenate([np.zeros(0, np.int64), *self.lacking]))


def plan_input(sampled: np.ndarray, needs: MethodNeeds, path: str) -> InputPlan:
    """The plan of an input whose sampling selects ``sampled``.

    Raises:
        InputChanged: ``sampled`` is not what an earlier run recorded (another count, or a settled frame that
            is no longer sampled): the file at this path changed since.
    """
    sampled = np.asarray(sampled, dtype=np.int64)
    settled = [None if frames is None else np.asarray(frames, dtype=np.int64) for frames in needs.settled]
    unknown = sorted(set(np.concatenate([np.zeros(0, np.int64), *(f for f in settled if f is not None)]).tolist())
                     - set(sampled.tolist()))
    if needs.recorded_sampled is not None and needs.recorded_sampled != len(sampled):
        raise InputChanged(path, f"its sampling now selects {len(sampled)} frames where an earlier run recorded "
                                 f"{needs.recorded_sampled}: the file changed since. Encode it into a new --output")
    if unknown:
        raise InputChanged(path, f"frames {unknown[:5]} that an earlier run recorded are no longer among its "
                                 "sampled frames: the file changed since. Encode it into a new --output")
    segments = [sampled[i:i + needs.segment_size] for i in range(0, len(sampled), needs.segment_size)]
    lacking = [np.zeros(0, np.int64) if frames is None else np.setdiff1d(sampled, frames) for frames in settled]
    return InputPlan(sampled, segments, lacking)


def input_rows(inputs: list[InputItem], states: list[OutputState], segment_size: int) -> list[dict]:
    """The run's input rows (typed columns, one per input that any method needs): what `DecodeInputs` is
    given. ``states`` holds one `OutputState` per method's output, in the run's method order.

    Each row: ``video_id``, ``source_path``, ``path``, ``filesystem``, ``problem`` (`InputItem`); ``finished``
    (per method: it needs nothing of the input); ``settled`` (per method: its frames in the shards or failed
    for good); ``recorded_sampled`` (the sampled-frame count an earlier run recorded, or -1); ``attempt``
    (this run's try of the input: one more than any recorded); ``decoder_failures`` (earlier tries that
    ended in a decoder failure, `pipeline.failures`)."""
    rows = []
    for item in inputs:
        video_id = item.video_id
        finished = [state.finished(video_id) for state in states]
        if all(finished):
            continue
        recorded = [state.sampled[video_id] for state in states if video_id in state.sampled]
        failures = set().union(*(state.errors[video_id].decoder_failures for state in states
                                 if video_id in state.errors))
        rows.append({
            "video_id": video_id,
            "source_path": item.source_path,
            "path": item.path,
            "filesystem": item.filesystem,
            "problem": item.problem,
            "finished": finished,
            "settled": [[] if done else sorted(state.settled(video_id)) for state, done in zip(states, finished)],
            "recorded_sampled": max(recorded) if recorded else -1,
            "attempt": 1 + max(state.attempt.get(video_id, 0) for state in states),
            "decoder_failures": len(failures),
            "segment_size": segment_size,
        })
    return rows


def needs_of(row: dict) -> MethodNeeds:
    """The `MethodNeeds` of an input row (`input_rows`), as Ray hands it over (lists or arrays)."""
    settled = tuple(None if done else tuple(int(i) for i in frames)
                    for done, frames in zip(row["finished"], row["settled"]))
    recorded = int(row["recorded_sampled"])
    return MethodNeeds(settled, recorded if recorded >= 0 else None, int(row["segment_size"]))
