"""Which files a run loads a vision tower from: the exact revision of a hub id or a local folder, found locally
first (an offline machine with the weights never waits on the network), pinned for every encoder; its image
processor's config; the names of its weights, without reading them."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError, RemoteEntryNotFoundError
from safetensors import safe_open
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

PROCESSOR_CONFIG = "preprocessor_config.json"
FINGERPRINT_PREFIX = "sha256:"  # a local checkpoint folder's revision: "sha256:" + 64 hex digits
# What transformers loads a tower from: its config and weights (single or sharded, with their index);
# not other files a checkpoint folder may hold (training_args.bin, optimizer states, READMEs).
FINGERPRINTED = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|"
                           r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?")

T = TypeVar("T")


class ModelUnavailableError(RuntimeError):
    """The vision tower's weights could not be found locally or fetched from the hub."""


def resolve_revision(model_name_or_path: str, revision: str | None = None) -> str:
    """The exact revision of ``model_name_or_path`` that a run loads, records, and pins every encoder to.

    - A hub id: the commit hash (40 hex digits) of the snapshot ``from_pretrained`` loads for ``revision``
      (default: the default branch; else a branch, tag or commit), found in the local hub cache first,
      then on the hub, as `load_local_first` does.
    - A local directory: ``"sha256:<64 hex>"``, a fingerprint of the files that define the tower: each
      ``config.json`` and weight file (``model*.safetensors``, ``pytorch_model*.bin`` and their shard
      indexes; not ``training_args.bin`` or other files) in it, by name and full content. It reads all
      of them, SHA-256 on one core: measured 0.65 s per GB from the page cache and 0.9-1.7 s per GB read
      from disk (a 2-core VM with SHA extensions; a disk slower than ~1 GB/s sets the pace instead), so
      about 1-3 s for a 1.7 GB CLIP ViT-L/14 checkpoint.

    Raises:
        ModelUnavailableError: the revision can be neither found locally nor downloaded (the message names
            ``--model PATH`` and ``--model-revision``), or ``revision`` is a local folder's fingerprint
            and ``model_name_or_path`` is not a directory here.
        ValueError: ``model_name_or_path`` is a local directory whose fingerprint is not ``revision``.
    """
    if is_local_directory(model_name_or_path, revision):
        return _check_fingerprint(model_name_or_path, revision)
    config_file = load_local_first(cached_file, model_name_or_path, revision, filename=CONFIG_NAME)
    if config_file is None:  # the hub cache records that the repository has no config.json at that revision
        raise ModelUnavailableError(_unavailable_message(
            model_name_or_path, revision, OSError(f"no {CONFIG_NAME} at that revision.")))
    return Path(config_file).parent.name  # the hub cache's snapshots/<commit hash>/config.json


def is_local_directory(model_name_or_path: str, revision: str | None) -> bool:
    """Whether ``model_name_or_path`` is a local directory (else it is a hub id).

    Raises:
        ModelUnavailableError: it is not a directory here, but ``revision`` is a local folder's fingerprint
            (the run was started with a folder that this node lacks).
    """
    if os.path.isdir(model_name_or_path):
        return True
    if revision is not None and revision.startswith(FINGERPRINT_PREFIX):
        raise ModelUnavailableError(
            f"The vision tower {model_name_or_path!r} is not a directory on this node, but this run recorded "
            f"the fingerprint of a local checkpoint folder ({revision}): give every node the same folder at that "
            "path (e.g. on a shared filesystem).")
    return False


def _check_fingerprint(directory: str, revision: str | None) -> str:
    """The fingerprint of the checkpoint in ``directory`` (see `resolve_revision`), checked against ``revision``.

    Raises:
        ValueError: ``revision`` is given and differs from the fingerprint.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and FINGERPRINTED.fullmatch(path.name):
            with path.open("rb") as handle:
                content = hashlib.file_digest(handle, "sha256").hexdigest()
            digest.update(f"{path.name}\0{content}\n".encode())
    fingerprint = FINGERPRINT_PREFIX + digest.hexdigest()
    if revision is not None and revision != fingerprint:
        raise ValueError(
            f"the checkpoint at {directory!r} on this node differs from the one this run recorded ({revision}, "
            f"--model-revision): its {CONFIG_NAME} and weight files have the fingerprint {fingerprint}. Give every "
            "node the same files, or pass --model-revision with this fingerprint to record these files instead.")
    return fingerprint


def load_local_first(load: Callable[..., T], model_name_or_path: str, revision: str | None = None, **kwargs) -> T:
    """``load`` (a ``from_pretrained``, or `cached_file`) from a local copy (a directory, or the hub cache)
    first, then the hub; ``revision`` goes to ``load`` as is.

    Local first means an offline machine with the weights never waits on the network. Raises
    `ModelUnavailableError` naming ``--model PATH`` when the files are neither local nor downloadable.
    """
    try:
        return load(model_name_or_path, local_files_only=True, revision=revision, **kwargs)
    except (OSError, HFValidationError) as local_error:
        if os.path.isdir(model_name_or_path):
            message = _unavailable_message(model_name_or_path, revision, local_error)
            raise ModelUnavailableError(message) from local_error
    try:
        return load(model_name_or_path, revision=revision, **kwargs)
    except (OSError, HFValidationError) as hub_error:
        raise ModelUnavailableError(_unavailable_message(model_name_or_path, revision, hub_error)) from hub_error


def load_pinned(load: Callable[..., T], model_name_or_path: str, revision: str | None, **kwargs) -> T:
    """``load`` exactly ``revision`` (see `resolve_revision`; None: what `load_local_first` finds) of the checkpoint.

    A hub id's revision goes to ``load``; a local directory is loaded, then its fingerprint is checked.

    Raises:
        ModelUnavailableError: see `load_local_first` and `is_local_directory`.
        ValueError: a local directory whose fingerprint is not ``revision``.
    """
    if not is_local_directory(model_name_or_path, revision):
        return load_local_first(load, model_name_or_path, revision, **kwargs)
    loaded = load_local_first(load, model_name_or_path, **kwargs)
    if revision is not None:
        _check_fingerprint(model_name_or_path, revision)
    return loaded


def _unavailable_message(model_name_or_path: str, revision: str | None, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if revision is None:
        return (
            f"Cannot load the vision tower {model_name_or_path!r}: {first_line} "
            "If this machine is offline, download the checkpoint elsewhere (e.g. `hf download "
            f"{model_name_or_path} --local-dir DIR`) and pass --model PATH with that local directory."
        )
    return (
        f"Cannot load revision {revision} (--model-revision) of the vision tower {model_name_or_path!r}: "
        f"{first_line} This machine's Hugging Face cache lacks it and it cannot be downloaded. Download it elsewhere "
        f"(e.g. `hf download {model_name_or_path} --revision {revision} --local-dir DIR`) and pass --model PATH "
        "with that local directory (the same on every node), or pass a --model-revision that this machine holds."
    )


def processor_config(model_name_or_path: str, revision: str | None = None) -> dict | None:
    """The checkpoint's ``preprocessor_config.json`` as a dict; None when it has none.

    A hub id's file comes from the hub cache, else from the hub (``from_pretrained`` caches only the config and
    weights, so the processor's file is often not there).

    Raises:
        ModelUnavailableError: a hub id whose file is neither cached (nor known to be absent) nor downloadable:
            the family's defaults could normalise differently from the checkpoint's own (DINOv2's ImageNet
            mean/std), so the run does not guess.
    """
    if is_local_directory(model_name_or_path, revision):
        path = Path(model_name_or_path) / PROCESSOR_CONFIG
        return json.loads(path.read_text()) if path.is_file() else None
    cached = try_to_load_from_cache(model_name_or_path, PROCESSOR_CONFIG, revision=revision)
    if cached is _CACHED_NO_EXIST:
        return None
    if cached is None:
        try:
            cached = hf_hub_download(model_name_or_path, PROCESSOR_CONFIG, revision=revision)
        except RemoteEntryNotFoundError:  # the repository has none (the hub said so; the cache now records it)
            return None
        except (OSError, HFValidationError) as error:
            raise ModelUnavailableError(
                f"{model_name_or_path!r}: its {PROCESSOR_CONFIG} (the image size, resize rule and mean/std its "
                f"frames need) is not in this machine's Hugging Face cache and cannot be downloaded ({error}). "
                f"Download it (e.g. `hf download {model_name_or_path} {PROCESSOR_CONFIG}`), or pass --model PATH "
                "with a local copy of the checkpoint.") from error
    return json.loads(Path(cached).read_text())


def local_weight_names(model_name_or_path: str, revision: str | None) -> set[str] | None:
    """The weight names of a checkpoint's safetensors found locally (None: not here, or not safetensors)."""
    if is_local_directory(model_name_or_path, revision):
        revision = None
    for name in (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME):
        try:
            path = cached_file(model_name_or_path, name, revision=revision, local_files_only=True,
                               _raise_exceptions_for_missing_entries=False)
        except (OSError, HFValidationError):
            return None
        if path is None:
            continue
        if name == SAFE_WEIGHTS_INDEX_NAME:
            return set(json.loads(Path(path).read_text())["weight_map"])
        with safe_open(path, "pt") as weights:
            return set(weights.keys())
    return None
