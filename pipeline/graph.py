"""The run's Ray Data graph: input rows → decode (CPU actor pool) → encode (actor pool) → the shard sink."""

from __future__ import annotations

import warnings

import pyarrow.fs as pafs
import ray

from operators.preprocess import Preprocessing
from pipeline.config import EncodeConfig
from pipeline.decoder import DecodeInputs
from pipeline.encoder import EncodeTokens
from pipeline.resources import ResourcePlan

ACTOR_RETRIES = 2
MAX_INPUT_BLOCKS = 4096  # inputs per block grow beyond this; a block's inputs are decoded one after the other


def build_dataset(rows: list[dict], config: EncodeConfig, preprocessing: Preprocessing,
                  filesystems: dict[str, pafs.FileSystem], plan: ResourcePlan,
                  encoder_stage: type = EncodeTokens) -> ray.data.Dataset:
    """inputs (`pipeline.plan.input_rows`, up to `MAX_INPUT_BLOCKS` blocks) → decode (CPU actor pool, each input
    read once, frames streamed in segment rows: `pipeline.decoder`) → encode (actor pool of ``encoder_stage``,
    `EncodeTokens` or a stand-in with its interface), sized and placed by ``plan``.

    Retries are bounded: an actor that dies is restarted, and its task retried, ``ACTOR_RETRIES`` times;
    after that the run fails (an input cannot do that: whatever happens in its decoder is its outcome)."""
    retries = {"max_restarts": ACTOR_RETRIES, "max_task_retries": ACTOR_RETRIES}
    with warnings.catch_warnings():
        # Ray Data's own default is unbounded (-1); the keyword form is the only way to bound it (Ray < 2.64).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
        return (
            ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_INPUT_BLOCKS))
            .flat_map(
                DecodeInputs,
                fn_constructor_kwargs={"config": config, "preprocessing": preprocessing, "filesystems": filesystems},
                # one input at a time per actor: inputs never queue behind one whose decoder hangs. A fixed
                # size: Ray (2.60) grows a pool only above 175 % use, which one task per actor never reaches.
                compute=ray.data.ActorPoolStrategy(size=min(plan.decoders, len(rows)), max_tasks_in_flight_per_actor=1),
                num_cpus=1,
                **retries,
            )
            .map_batches(
                encoder_stage,
                fn_constructor_kwargs={"config": config, "preprocessing": preprocessing, "threads": plan.encoder_threads},
                # segment rows: whole segments per batch (a temporal method reduces each together)
                batch_size=max(1, config.batch_size // config.segment_size()),
                compute=ray.data.ActorPoolStrategy(
                    size=plan.encoders, max_concurrent_calls_per_actor=plan.encoder_calls,
                    enable_true_multi_threading=plan.encoder_calls > 1),
                num_gpus=plan.encoder_gpus,
                num_cpus=plan.encoder_cpus,
                batch_format="numpy",
                **retries,
            )
        )
