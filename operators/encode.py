"""Run a CLIP vision tower once per batch and return everything PruMerge needs.

LLaVA feeds its projector the hidden states of the penultimate layer (``layer=-2``). PruMerge scores
those tokens with the CLS query of the *next* block's self-attention and merges them by that block's
keys. Both come from the block's ``layer_norm1`` → ``q_proj`` / ``k_proj``, so one pass through the
embeddings and the first ``L`` blocks, plus two projections of the block that follows, yields all of
it. Layers after that are never run (LLaVA discards their output) and are dropped at load time.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from einops import rearrange
from huggingface_hub.errors import HFValidationError
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.utils import CONFIG_NAME, cached_file
from transformers.utils import logging as hf_logging

DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"

ClsAttention = Literal["full_width", "head_mean"]

FINGERPRINT_PREFIX = "sha256:"  # a local checkpoint folder's revision: "sha256:" + 64 hex digits
# What transformers loads a tower from: its config and weights (single or sharded, with their index);
# not other files a checkpoint folder may hold (training_args.bin, optimizer states, READMEs).
FINGERPRINTED = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|"
                           r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?")

T = TypeVar("T")


class ModelUnavailableError(RuntimeError):
    """The vision tower's weights could not be found locally or fetched from the hub."""


@dataclass(frozen=True)
class EncoderOutput:
    """What one forward pass yields for a batch of B frames/tiles with N patches of width C."""

    features: torch.Tensor  # [B, N, C] hidden states of the selected layer, patch tokens only
    keys: torch.Tensor  # [B, N, C] k_proj of the block consuming those states, patch tokens only
    cls_attn: torch.Tensor  # [B, N] float32, CLS query's attention over the patches (CLS column dropped)


def resolve_revision(model_name_or_path: str, revision: str | None = None) -> str:
    """The exact revision of ``model_name_or_path`` that a run loads, records, and pins every encoder to.

    - A hub id: the commit hash (40 hex digits) of the snapshot ``from_pretrained`` loads for ``revision``
      (default: the default branch; else a branch, tag or commit), found in the local hub cache first,
      then on the hub, as `_from_pretrained` does.
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
    if _is_local_directory(model_name_or_path, revision):
        return _check_fingerprint(model_name_or_path, revision)
    config_file = _from_pretrained(cached_file, model_name_or_path, revision, filename=CONFIG_NAME)
    if config_file is None:  # the hub cache records that the repository has no config.json at that revision
        raise ModelUnavailableError(_unavailable_message(
            model_name_or_path, revision, OSError(f"no {CONFIG_NAME} at that revision.")))
    return Path(config_file).parent.name  # the hub cache's snapshots/<commit hash>/config.json


def _is_local_directory(model_name_or_path: str, revision: str | None) -> bool:
    """Whether ``model_name_or_path`` is a local directory (else it is a hub id).

    Raises:
        ModelUnavailableError: it is not a directory here, but ``revision`` is a local folder's fingerprint
            (the run was started with a folder that this node lacks).
    """
    if os.path.isdir(model_name_or_path):
        return True
    if revision is not None and revision.startswith(FINGERPRINT_PREFIX):
        raise ModelUnavailableError(
            f"The CLIP vision tower {model_name_or_path!r} is not a directory on this node, but this run recorded "
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


def _from_pretrained(load: Callable[..., T], model_name_or_path: str, revision: str | None = None, **kwargs) -> T:
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


def _load_pinned(load: Callable[..., T], model_name_or_path: str, revision: str | None, **kwargs) -> T:
    """``load`` exactly ``revision`` (see `resolve_revision`; None: what `_from_pretrained` finds) of the checkpoint.

    A hub id's revision goes to ``load``; a local directory is loaded, then its fingerprint is checked.

    Raises:
        ModelUnavailableError: see `_from_pretrained` and `_is_local_directory`.
        ValueError: a local directory whose fingerprint is not ``revision``.
    """
    if not _is_local_directory(model_name_or_path, revision):
        return _from_pretrained(load, model_name_or_path, revision, **kwargs)
    loaded = _from_pretrained(load, model_name_or_path, **kwargs)
    if revision is not None:
        _check_fingerprint(model_name_or_path, revision)
    return loaded


def load_vision_config(model_name_or_path: str, revision: str | None = None) -> CLIPVisionConfig:
    """The tower's config only (no weights): a cheap, early check that the model can be loaded.

    ``revision`` pins it as in `_load_pinned` (a local directory's fingerprint check reads all its weights).

    Raises:
        ModelUnavailableError, ValueError: see `_load_pinned`.
    """
    return _load_pinned(CLIPVisionConfig.from_pretrained, model_name_or_path, revision)


def load_vision_tower(model_name_or_path: str, dtype: torch.dtype, revision: str | None = None) -> CLIPVisionModel:
    """Load a Hugging Face CLIP vision tower (a `CLIPVisionModel` or full `CLIPModel` checkpoint), exactly
    ``revision`` of it when given (see `resolve_revision`), else whatever `_from_pretrained` finds.

    A full CLIP checkpoint's text tower and projections are left out on purpose, so transformers' load
    report, which lists each of those weights (hundreds of lines per encoder actor), is not shown. What
    that report exists to warn about is checked here instead.

    Raises:
        ModelUnavailableError: the checkpoint (at ``revision``) cannot be found (see `_load_pinned`).
        ValueError: the checkpoint lacks weights of the vision tower, or holds them with other shapes
            (the tower would run with random values for them); or it is a local directory whose
            fingerprint is not ``revision``.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = _load_pinned(CLIPVisionModel.from_pretrained, model_name_or_path, revision, dtype=dtype,
                                   output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    absent = sorted(info["missing_keys"]) + sorted(str(key) for key in info["mismatched_keys"])
    if absent:
        listed = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise ValueError(f"{model_name_or_path!r} is not a complete CLIP vision checkpoint: vision weights "
                         f"missing or of other shapes: {listed}")
    return model


def _unavailable_message(model_name_or_path: str, revision: str | None, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if revision is None:
        return (
            f"Cannot load the CLIP vision tower {model_name_or_path!r}: {first_line} "
            "If this machine is offline, download the checkpoint elsewhere (e.g. `hf download "
            f"{model_name_or_path} --local-dir DIR`) and pass --model PATH with that local directory."
        )
    return (
        f"Cannot load revision {revision} (--model-revision) of the CLIP vision tower {model_name_or_path!r}: "
        f"{first_line} This machine's Hugging Face cache lacks it and it cannot be downloaded. Download it elsewhere "
        f"(e.g. `hf download {model_name_or_path} --revision {revision} --local-dir DIR`) and pass --model PATH "
        "with that local directory (the same on every node), or pass a --model-revision that this machine holds."
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # LLaVA runs its tower in fp16 on GPUs; CPUs have no fast half-precision matmul.
    return torch.float16 if device.type == "cuda" else torch.float32


class ClipEncoder:
    """Callable that maps preprocessed pixels ``[B, 3, H, W]`` to an `EncoderOutput` in one pass.

    Args:
        model_name_or_path: hub id or local directory of any Hugging Face CLIP vision checkpoint.
        layer: index into the tower's hidden states (0 = embeddings, -1 = last block's output), as in
            ``output_hidden_states``. Default -2, the layer LLaVA uses. The block after it must exist,
            since it supplies the keys and the CLS attention, so -1 is rejected.
        device: where the tower runs; default CUDA when available, else CPU.
        dtype: tower weights' dtype; default fp16 on CUDA, fp32 on CPU.
        cls_attention: ``"full_width"`` (the published PruMerge score, ``softmax(q_cls·kᵀ/√C)`` with
            the full-width projections) or ``"head_mean"`` (the block's true attention probabilities of
            the CLS query, averaged over heads).
        revision: load exactly this revision of it (see `resolve_revision`: a hub commit hash, branch or tag,
            or a local directory's fingerprint, checked after loading); None: whatever `_from_pretrained` finds.

    Raises:
        ModelUnavailableError, ValueError: see `load_vision_tower`; ValueError also for ``layer`` or
            ``cls_attention`` out of range.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        layer: int = -2,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cls_attention: ClsAttention = "full_width",
        revision: str | None = None,
    ) -> None:
        if cls_attention not in ("full_width", "head_mean"):
            raise ValueError(f"cls_attention must be 'full_width' or 'head_mean', got {cls_attention!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.model_name_or_path = model_name_or_path
        self.revision = revision
        self.cls_attention = cls_attention

        model = load_vision_tower(model_name_or_path, self.dtype, revision)
        num_layers = model.config.num_hidden_layers
        # hidden_states has num_layers + 1 entries; entry L is the output of blocks[:L].
        resolved = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= resolved < num_layers:
            raise ValueError(
                f"layer={layer} must select hidden states 0..{num_layers - 1} (or -{num_layers + 1}..-2) of "
                f"this {num_layers}-block tower: the block after it provides the keys and CLS attention"
            )
        self.layer = resolved
        # Keep blocks[:L] to run plus block L for its layer_norm1/q_proj/k_proj; later blocks are never used.
        model.encoder.layers = model.encoder.layers[: resolved + 1]
        self.model = model.to(self.device).eval()

        config = model.config
        self.image_size: int = config.image_size
        self.patch_size: int = config.patch_size
        self.grid_size: int = config.image_size // config.patch_size
        self.num_patches: int = self.grid_size**2
        self.hidden_size: int = config.hidden_size
        self.num_heads: int = config.num_attention_heads

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """Encode ``pixel_values [B, 3, H, W]`` (already resized and normalised for the model)."""
        pixels = pixel_values.to(self.device, self.dtype, non_blocking=True)
        hidden = self.model.embeddings(pixels)  # [B, 1+N, C]
        hidden = self.model.pre_layrnorm(hidden)
        blocks = self.model.encoder.layers
        for block in blocks[: self.layer]:
            hidden = block(hidden, None)  # [B, 1+N, C]

        scoring_block = blocks[self.layer]
        normed = scoring_block.layer_norm1(hidden)
        queries = scoring_block.self_attn.q_proj(normed[:, :1])  # [B, 1, C], the CLS query only
        keys = scoring_block.self_attn.k_proj(normed)  # [B, 1+N, C]

        return EncoderOutput(
            features=hidden[:, 1:],
            keys=keys[:, 1:],
            cls_attn=self._cls_attention(queries, keys),
        )

    def _cls_attention(self, cls_query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """CLS→patch attention ``[B, N]`` (float32) from ``cls_query [B,1,C]`` and ``keys [B,1+N,C]``."""
        cls_query, keys = cls_query.float(), keys.float()
        if self.cls_attention == "full_width":
            logits = torch.einsum("bqc,bnc->bn", cls_query, keys) / math.sqrt(keys.shape[-1])
            attention = logits.softmax(dim=-1)  # [B, 1+N]
        else:
            heads_q = rearrange(cls_query, "b 1 (h d) -> b h d", h=self.num_heads)
            heads_k = rearrange(keys, "b n (h d) -> b h n d", h=self.num_heads)
            logits = torch.einsum("bhd,bhnd->bhn", heads_q, heads_k) / math.sqrt(heads_q.shape[-1])
            attention = logits.softmax(dim=-1).mean(dim=1)  # [B, 1+N]
        return attention[:, 1:]
