"""Where each method of a run writes, what its files record about how their tokens were made, and the checks
that keep one output to one way of making tokens and one layout.

One method writes to ``--output`` itself; several write ``OUT/<method>/`` each (`MethodSpec.dirname`),
every folder a complete output of its own. The checks run twice: before the run takes any lease (a clean
refusal that writes nothing) and again once it holds the leases (`pipeline.run`), so that a job that
committed in between cannot be mixed with this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.methods import HOLITOM_DEFAULTS, MethodSpec
from operators.preprocess import Preprocessing
from operators.towers import TowerInfo
from pipeline.config import EncodeConfig
from pipeline.inputs import VIDEO_ID_RULE, filesystem_and_path, redact_credentials
from pipeline.schema import READABLE_VERSIONS, SCHEMA_VERSION, differing_settings, read_file_metadata
from pipeline.store import UNREADABLE, Store, committed_files, method_folders


@dataclass(frozen=True)
class MethodOutput:
    """Where one method's rows go: its output directory or URI, what its files record (`run_metadata`), and,
    once the run holds its lease, the lease's fence (`pipeline.lease.Fence`)."""

    output: str
    run_metadata: dict
    fence: object = None

    def store(self) -> Store:
        """The fenced writer of this output."""
        return Store(self.output, self.fence)


def method_params(config: EncodeConfig, spec: MethodSpec) -> dict:
    """What a method's output records about its parameters."""
    if spec.temporal:
        return {"retention": spec.retention, "importance": config.importance, "segment_frames": config.segment_frames,
                **HOLITOM_DEFAULTS}
    return {"budget": spec.budget, "k_neighbors": config.k_neighbors, "importance": config.importance}


def run_metadata(config: EncodeConfig, tower: TowerInfo, preprocessing: Preprocessing,
                 spec: MethodSpec | None = None) -> dict:
    """What every file of ``spec``'s output (default: the run's first method) records about how its tokens
    were made (``config`` resolved by `EncodeConfig.for_tower`)."""
    spec = spec or config.methods()[0]
    return {
        "media": config.media,
        "video_id_rule": VIDEO_ID_RULE,
        "model": config.model,
        "model_revision": config.model_revision,
        "tower": tower.family,
        "layer": config.layer,
        "hidden_size": tower.hidden_size,
        "patch_grid": [tower.grid_size, tower.grid_size],
        "patch_size": tower.patch_size,
        "method": spec.name,
        "method_params": method_params(config, spec),
        "preprocessing": {
            **preprocessing.to_metadata(),
            "anyres": config.anyres,
            "pinpoints": config.pinpoints if config.anyres else None,
        },
        "sampling": {"num_frames": config.num_frames, "fps": config.fps, "max_frames": config.max_frames,
                     # only when on: outputs written without the option read the same
                     **({"key_frames": True, "key_frame_tolerance_s": config.key_frame_tolerance_s}
                        if config.key_frames else {})},
    }


def method_outputs(config: EncodeConfig, tower: TowerInfo, preprocessing: Preprocessing) -> list[MethodOutput]:
    """Where each method of ``config`` writes, with its metadata: the output itself for one method,
    ``OUT/<method>/`` (`MethodSpec.dirname`) for each of several."""
    specs = config.methods()
    if len(specs) == 1:
        return [MethodOutput(config.output, run_metadata(config, tower, preprocessing, specs[0]))]
    return [MethodOutput(f"{config.output.rstrip('/')}/{spec.dirname}", run_metadata(config, tower, preprocessing, spec))
            for spec in specs]


def check_outputs(output: str, outputs: list[MethodOutput]) -> None:
    """`check_layout`, then `check_settings` of each method's output.

    Raises:
        ValueError: see there.
    """
    check_layout(output, outputs)
    for target in outputs:
        check_settings(target.output, target.run_metadata)


def check_layout(output: str, outputs: list[MethodOutput]) -> None:
    """Refuse to mix the two layouts in one output: one method's files at the top, or a folder per method.

    Raises:
        ValueError: several methods asked for an output holding one method's files, or one method for an
            output holding method folders (naming them).
    """
    fs, root = filesystem_and_path(output)
    if len(outputs) > 1:
        records = fs.get_file_info([f"{root}/manifest.json", f"{root}/runs"])
        if any(info.type != pafs.FileType.NotFound for info in records) or any(
                committed_files(fs, root, sub) for sub in ("index", "errors", "shards")):
            raise ValueError(f"{redact_credentials(output)} holds the output of a single method (or a run's record of "
                             "one); several methods write a folder each: use a new --output")
        return
    folders = method_folders(fs, root)
    if folders:
        raise ValueError(f"{redact_credentials(output)} holds one folder per method ({', '.join(folders)}): "
                         f"to add to one of them alone, give it as --output (e.g. {output.rstrip('/')}/{folders[0]})")


def check_settings(output: str, metadata: dict) -> None:
    """Refuse to add tokens made another way to an existing output (mixed shards mislead readers).

    The first readable index file (else error file: an output whose every input failed; else a shard
    not yet indexed) says how the output was made; an error file without metadata was written before
    error files carried it. Unreadable files are passed over here: the run reports them once it holds
    the output (`pipeline.repair.prepare_output`, exit 4).

    Raises:
        ValueError: the output's files were made with other settings, or by an older version.
    """
    fs, root = filesystem_and_path(output)
    for sub in ("index", "errors", "shards"):
        for path in committed_files(fs, root, sub):
            try:
                with fs.open_input_file(path) as handle:
                    existing = read_file_metadata(pq.read_schema(handle))
            except UNREADABLE:
                continue
            _refuse_other_settings(output, existing, {"schema_version": SCHEMA_VERSION, **metadata})
            return


def _refuse_other_settings(output: str, existing: dict, expected: dict) -> None:
    output = redact_credentials(output)
    if not existing:
        raise ValueError(f"{output} holds files of an older version, which record no settings and made video ids "
                         "another way: the same inputs would be encoded again under new ids. Use a new --output.")
    differing = differing_settings(existing, expected)
    if not differing:
        return
    lines = "".join(f"\n  {key}: existing {existing.get(key)!r}, this run {expected.get(key)!r}" for key in differing)
    if "video_id_rule" in differing:
        why = ("\nIt was written by an older version, whose video ids are made another way: the same inputs would "
               "be encoded again under new ids. Use a new --output.")
    elif "schema_version" in differing:
        reader = "this version" if existing.get("schema_version") in READABLE_VERSIONS else "that version"
        why = (f"\nIt was written by another version (schema {existing.get('schema_version')!r}; this one writes "
               f"{expected['schema_version']!r}), which this one cannot add to. Use a new --output ({reader} reads "
               "it).")
    else:
        why = "\nUse a new --output, or the same settings to resume."
    raise ValueError(f"{output} already holds files made with different settings:{lines}{why}")
