"""Where every frame of a run is accounted: the per-frame reconciliation of what the run planned against what
its outputs hold at its end, and the run's summary.

**Reconciliation.** For every input the run read and every method that lacked frames of it: if the decoder
sent the input's plan (its sampled frames), each frame the method lacked must now be in the method's shards
or in an error row of this try (`pipeline.state`); without a plan, the input must have a whole-input error
row of this try. Anything else ended nowhere: the run fails, naming each.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass

from operators.frames import frame_span
from pipeline.inputs import Listing
from pipeline.sink import WriteStats
from pipeline.state import OutputState

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What one run did. Each input counts once, by what the outputs hold for it at the end: ``encoded`` (all
    its sampled frames in the shards of every method), ``partly_failed`` (some frames in shards, others failed
    for good, e.g. a damaged tail), ``failed`` (errors only, for good), ``retryable`` (some frames, or the
    whole input, in error rows a later run tries again: `pipeline.failures`), ``skipped`` (nothing left to do
    from earlier runs; ``skipped_failed`` of them with error rows), or ``missing`` (a planned frame that ended
    nowhere: a fault, named in ``unaccounted``). ``duplicates``: names that listed an input already listed;
    ``listing_notes``: lines, rows or folders the listing skipped (each named in the log)."""

    inputs: int
    duplicates: int
    listing_notes: int
    skipped: int
    skipped_failed: int
    encoded: int
    partly_failed: int
    failed: int
    retryable: int
    missing: int
    frames: int
    rows: int
    error_rows: int
    mean_tokens_per_row: float
    frames_per_s: float
    bytes_written: int
    wall_s: float
    methods: dict[str, dict] = dataclasses.field(default_factory=dict)  # several methods: each one's counts
    unaccounted: list[str] = dataclasses.field(default_factory=list)  # planned frames that ended nowhere

    def lines(self) -> list[str]:
        failed_before = f", {self.skipped_failed} of them with error rows" if self.skipped_failed else ""
        counts = (f"frames {self.frames}, by method:" if self.methods else
                  f"frames {self.frames} ({self.rows} rows incl. tiles), mean tokens/row {self.mean_tokens_per_row:.1f}")
        lines = [
            f"inputs {self.inputs}: encoded {self.encoded}, partly failed {self.partly_failed}, failed {self.failed}, "
            f"to retry {self.retryable}, skipped (already done) {self.skipped}{failed_before}",
            counts,
            *(f"  {method}: frames {m['frames']}, {m['rows']} rows, mean tokens/row {m['mean_tokens_per_row']:.1f}, "
              f"{m['bytes_written'] / 1e6:.2f} MB, {m['error_rows']} error rows" for method, m in self.methods.items()),
            f"{self.frames_per_s:.2f} frames/s over {self.wall_s:.1f} s, {self.bytes_written / 1e6:.2f} MB written, "
            f"{self.error_rows} error rows",
        ]
        if self.retryable:
            lines.append(f"inputs with failures a later run tries again: {self.retryable} (run the same command again)")
        if self.duplicates:
            lines.append(f"names of inputs already listed: {self.duplicates} (each file is encoded once; named in the log)")
        if self.listing_notes:
            lines.append(f"skipped while listing: {self.listing_notes} (lines, rows or folders; named in the log)")
        if self.missing:
            lines.append(f"inputs with planned frames in neither shards nor error rows: {self.missing}")
            lines += [f"  {line}" for line in self.unaccounted[:20]]
        return lines


def reconcile(rows: list[dict], plans: dict[str, list[int]], states: list[OutputState],
              methods: list[str]) -> dict[str, list[str]]:
    """Per input that has planned frames in neither shards nor error rows, one line per method saying which
    (see the module). ``rows`` are the run's input rows (`pipeline.plan.input_rows`), ``plans`` the sampled
    frames the decoders sent, ``states`` each method's output as it is now."""
    unaccounted: dict[str, list[str]] = {}
    for row in rows:
        video_id, attempt = row["video_id"], int(row["attempt"])
        for method, state, finished, settled in zip(methods, states, row["finished"], row["settled"]):
            if finished:
                continue
            errors = state.errors.get(video_id)
            this_try = [r for r in errors.rows if r["attempt"] == attempt] if errors else []
            if any(not r["frame_indices"] for r in this_try):
                continue  # the whole input failed on this try
            if video_id not in plans:
                lost = "the whole input (no plan and no error row)"
            else:
                covered = state.committed(video_id).union(*(r["frame_indices"] for r in this_try))
                missing = sorted(set(plans[video_id]) - set(int(i) for i in settled) - covered)
                if not missing:
                    continue
                lost = frame_span(missing)
            unaccounted.setdefault(video_id, []).append(f"{row['source_path']} ({method}): {lost}")
    return unaccounted


def summarize_run(listing: Listing, rows: list[dict], states: list[OutputState], stats: list[WriteStats],
                  methods: list[str], unaccounted: dict[str, list[str]], wall_s: float) -> RunSummary:
    """The run's summary: each listed input counted once by what every method's output holds for it now
    (see `RunSummary`); frames: the most any method committed; rows, tokens, bytes and error rows: all
    methods' together. With several methods, ``methods`` holds each one's own counts."""
    read = {row["video_id"] for row in rows}
    outcomes: dict[str, int] = {"encoded": 0, "partly_failed": 0, "failed": 0, "retryable": 0}
    skipped = skipped_failed = 0
    for item in listing.items:
        video_id = item.video_id
        if video_id not in read:
            skipped += 1
            skipped_failed += any(video_id in state.errors for state in states)
        elif video_id not in unaccounted:
            outcomes[_outcome(video_id, states)] += 1
    rows_written = sum(s.rows for s in stats)
    frames = max(s.frames for s in stats)
    summary = RunSummary(
        inputs=len(listing.items), duplicates=len(listing.duplicates), listing_notes=len(listing.notes),
        skipped=skipped, skipped_failed=skipped_failed, **outcomes, missing=len(unaccounted), frames=frames,
        rows=rows_written, error_rows=sum(s.error_rows for s in stats),
        mean_tokens_per_row=sum(s.tokens for s in stats) / rows_written if rows_written else 0.0,
        frames_per_s=frames / wall_s if wall_s else 0.0, bytes_written=sum(s.bytes for s in stats), wall_s=wall_s,
        unaccounted=[line for lines in unaccounted.values() for line in lines])
    if len(methods) > 1:
        summary.methods = {method: _method_counts(s) for method, s in zip(methods, stats)}
    return summary


def _outcome(video_id: str, states: list[OutputState]) -> str:
    errors = [state.errors[video_id] for state in states if video_id in state.errors]
    if any(e.retryable or e.whole == "retryable" for e in errors):
        return "retryable"
    if not any(e.permanent or e.whole for e in errors):
        return "encoded"
    return "partly_failed" if any(state.frames.get(video_id, 0) for state in states) else "failed"


def _method_counts(stats: WriteStats) -> dict:
    counts = asdict(stats)
    for name in ("encoded_videos", "failed_videos"):
        counts.pop(name)
    counts["bytes_written"] = counts.pop("bytes")
    counts["mean_tokens_per_row"] = stats.tokens / stats.rows if stats.rows else 0.0
    return counts
