"""The vision-tower families the encoder runs, each described in one place, and what a checkpoint says about its tower.

Every family is a pre-norm ViT: embeddings, then blocks whose self-attention reads ``norm(hidden)`` through
``q_proj`` / ``k_proj``. They differ in where those modules live, whether a CLS token leads the patches, how
the pixels enter the embeddings, whether an attention-pooling head (SigLIP's probe) follows the blocks, and
which image processor (size, resize rule, mean/std) prepares their input. Each `Family` subclass states
exactly that and nothing else; `operators.encode.VisionEncoder` runs all of them the same way.

Families (config ``model_type`` → model class):

* ``clip``: ``clip``, ``clip_vision_model`` → `CLIPVisionModel` (LLaVA-1.5's CLIP ViT-L/14-336). CLS token.
* ``siglip``: ``siglip``, ``siglip_vision_model`` → `SiglipVisionModel` (LLaVA-OneVision's and LLaVA-Video's
  SigLIP so400m/14-384; SigLIP 2's fixed-resolution checkpoints are of this type too). No CLS token; probe head.
* ``siglip2``: ``siglip2``, ``siglip2_vision_model`` → `Siglip2VisionModel` (SigLIP 2 NaFlex). No CLS token;
  probe head. Run here at one square size: the square grid of its position embeddings (16×16 patches of
  16 px = 256 px for the released checkpoints), not NaFlex's aspect-preserving variable grid.
* ``vit``: ``vit`` → `ViTModel`; ``dinov2``: ``dinov2`` → `Dinov2Model`. CLS token.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from einops import rearrange
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, PretrainedConfig,
                          PreTrainedModel, Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig,
                          SiglipVisionModel, ViTConfig, ViTModel)
from transformers.utils import CONFIG_NAME, cached_file
from transformers.utils import logging as hf_logging

from operators.checkpoint import (PROCESSOR_CONFIG, ModelUnavailableError, is_local_directory, load_local_first,
                                  load_pinned, local_weight_names, processor_config)
from operators.preprocess import CLIP_MEAN, CLIP_STD, Preprocessing

logger = logging.getLogger(__name__)

Importance = Literal["cls", "cls_head_mean", "probe", "mean_received"]
IMPORTANCE_RULES: tuple[str, ...] = ("cls", "cls_head_mean", "probe", "mean_received")
HALF = (0.5, 0.5, 0.5)  # SigLIP's and ViT's processors: [0, 1] → [-1, 1]


class Family:
    """How one family of towers is loaded and run: class attributes say what differs and where its modules live;
    a family overrides a method only where its computation differs (how pixels enter, its input size).

    ``processor`` holds the family's image-processor defaults (those of its Hugging Face processor class), which
    a checkpoint's ``preprocessor_config.json`` overrides: ``size`` ({"shortest_edge": R} or {"height", "width"}),
    ``do_center_crop``, ``crop_size``, ``image_mean``, ``image_std``.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]
    cls_token: ClassVar[bool] = True  # a CLS token leads the patches in every block
    fixed_size: ClassVar[bool] = True  # position embeddings for config.image_size only
    processor: ClassVar[dict]
    blocks_path: ClassVar[str] = "encoder.layers"  # the model's list of blocks
    attention_norm_name: ClassVar[str] = "layer_norm1"  # in a block: the norm its q_proj / k_proj read
    attention_name: ClassVar[str] = "self_attn"  # in a block: the self-attention holding q_proj and k_proj

    @classmethod
    def blocks(cls, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(cls.blocks_path)

    @classmethod
    def set_blocks(cls, model: nn.Module, blocks: nn.ModuleList) -> None:
        parent, _, name = cls.blocks_path.rpartition(".")
        setattr(model.get_submodule(parent), name, blocks)

    @staticmethod
    def embed(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, S, S]`` (normalised) → the first block's input ``[B, P+N, C]`` (P = 1 with a CLS token)."""
        return model.embeddings(pixels)

    @classmethod
    def attention_norm(cls, block: nn.Module) -> nn.Module:
        """The norm whose output the block's ``q_proj`` / ``k_proj`` read."""
        return getattr(block, cls.attention_norm_name)

    @classmethod
    def attention(cls, block: nn.Module) -> nn.Module:
        """The block's self-attention, holding ``q_proj`` and ``k_proj`` (``[C] → [C]`` linear maps)."""
        return getattr(block, cls.attention_name)

    @staticmethod
    def input_size(config: PretrainedConfig, processed: int | None, model_name_or_path: str) -> int:
        """The square input (px) the tower runs at, given the size its image processor makes (None: not known).

        Raises ValueError when the tower cannot take ``processed``."""
        if processed is not None and processed != config.image_size:
            raise ValueError(f"{model_name_or_path!r}: its {PROCESSOR_CONFIG} makes {processed}-px images but its "
                             f"position embeddings are for {config.image_size} px")
        return config.image_size

    @staticmethod
    def declares_probe(config: PretrainedConfig) -> bool:
        """Whether the config declares SigLIP's attention-pooling head (a learnt probe query); `has_probe` also
        checks its weights."""
        return False


class ClipFamily(Family):
    name = "clip"
    model_types = ("clip", "clip_vision_model")
    config_class = CLIPVisionConfig
    model_class = CLIPVisionModel
    processor = {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": 224,
                 "image_mean": CLIP_MEAN, "image_std": CLIP_STD}

    @staticmethod
    def embed(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model.pre_layrnorm(model.embeddings(pixels))  # CLIP normalises before the first block


class SiglipFamily(Family):
    name = "siglip"
    model_types = ("siglip", "siglip_vision_model")
    config_class = SiglipVisionConfig
    model_class = SiglipVisionModel
    cls_token = False
    processor = {"size": {"height": 224, "width": 224}, "do_center_crop": False, "image_mean": HALF, "image_std": HALF}

    @staticmethod
    def declares_probe(config: PretrainedConfig) -> bool:
        return bool(getattr(config, "vision_use_head", True))


class Siglip2Family(SiglipFamily):
    name = "siglip2"
    model_types = ("siglip2", "siglip2_vision_model")
    config_class = Siglip2VisionConfig
    model_class = Siglip2VisionModel
    processor = {"do_center_crop": False, "image_mean": HALF, "image_std": HALF}  # NaFlex: no fixed size

    @staticmethod
    def embed(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        patch = model.config.patch_size
        rows, cols = pixels.shape[2] // patch, pixels.shape[3] // patch
        # NaFlex input: patches flattened as Siglip2ImageProcessor does (row-major patches, pixels (y, x, channel))
        patches = rearrange(pixels, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=patch, pw=patch)
        shapes = torch.tensor([[rows, cols]], device=pixels.device).expand(len(pixels), 2)
        return model.embeddings(patches, shapes)

    @staticmethod
    def input_size(config: PretrainedConfig, processed: int | None, model_name_or_path: str) -> int:
        return config.patch_size * math.isqrt(config.num_patches)  # its position-embedding grid, unresized


class VitFamily(Family):
    name = "vit"
    model_types = ("vit",)
    config_class = ViTConfig
    model_class = ViTModel
    processor = {"size": {"height": 224, "width": 224}, "do_center_crop": False, "image_mean": HALF, "image_std": HALF}
    blocks_path, attention_norm_name, attention_name = "layers", "layernorm_before", "attention"


class Dinov2Family(Family):
    name = "dinov2"
    model_types = ("dinov2",)
    config_class = Dinov2Config
    model_class = Dinov2Model
    fixed_size = False  # interpolates its position embeddings to any input
    processor = {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": 224,
                 "image_mean": CLIP_MEAN, "image_std": CLIP_STD}  # BitImageProcessor's defaults
    blocks_path, attention_norm_name, attention_name = "encoder.layer", "norm1", "attention"

    @staticmethod
    def input_size(config: PretrainedConfig, processed: int | None, model_name_or_path: str) -> int:
        return processed


FAMILIES: tuple[type[Family], ...] = (ClipFamily, SiglipFamily, Siglip2Family, VitFamily, Dinov2Family)


@dataclass(frozen=True)
class TowerInfo:
    """What a checkpoint's ``config.json`` and ``preprocessor_config.json`` say about its vision tower (no weights)."""

    family: str  # a `FAMILIES` name
    hidden_size: int  # C
    num_layers: int
    num_heads: int
    patch_size: int  # px
    cls_token: bool
    has_probe: bool
    preprocessing: Preprocessing  # the checkpoint's own rule at its input size S (``preprocessing.image_size``)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def grid_size(self) -> int:
        """Patches per side: the patch grid is ``grid_size × grid_size``."""
        return self.image_size // self.patch_size

    @property
    def importance_rules(self) -> tuple[str, ...]:
        return importance_rules(self.cls_token, self.has_probe)

    @property
    def default_importance(self) -> str:
        return default_importance(self.cls_token, self.has_probe)

    def check_importance(self, rule: str) -> None:
        check_importance(rule, self.family, self.cls_token, self.has_probe)


def resolve_layer(layer: int, num_layers: int) -> int:
    """``layer`` (an index into ``output_hidden_states``: 0 the embeddings, -1 the last block's output) as the
    number of blocks run before it, ``0 <= L < num_layers``: block L, which scores the states, must exist.

    Raises ValueError naming ``--layer`` when it does not select such states."""
    # hidden_states has num_layers + 1 entries; entry L is the output of blocks[:L].
    resolved = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= resolved < num_layers:
        raise ValueError(f"--layer {layer}: it must select hidden states 0..{num_layers - 1} (or -{num_layers + 1}..-2) "
                         f"of this {num_layers}-block tower: the block after it provides the keys and the attention")
    return resolved


def importance_rules(cls_token: bool, has_probe: bool) -> tuple[str, ...]:
    """The `IMPORTANCE_RULES` a tower can compute: the CLS rules need a CLS token, ``probe`` SigLIP's head."""
    return tuple(rule for rule in IMPORTANCE_RULES if (cls_token if rule.startswith("cls") else
                                                       has_probe if rule == "probe" else True))


def default_importance(cls_token: bool, has_probe: bool) -> str:
    """``cls`` (PruMerge's CLS attention) with a CLS token, else ``probe``, else ``mean_received``."""
    return "cls" if cls_token else "probe" if has_probe else "mean_received"


def check_importance(rule: str, family: str, cls_token: bool, has_probe: bool) -> None:
    """Raises ValueError (naming ``--importance``) when a ``family`` tower cannot compute ``rule``."""
    allowed = importance_rules(cls_token, has_probe)
    if rule not in allowed:
        why = ("it has no CLS token" if rule.startswith("cls") else
               "its checkpoint has no attention-pooling head" if rule == "probe" else "no such rule")
        raise ValueError(f"--importance {rule}: this {family} tower cannot compute it ({why}); use one of "
                         f"{', '.join(allowed)}")


def family_of(model_type: str, model_name_or_path: str) -> type[Family]:
    """The `Family` of a config's ``model_type``. Raises ValueError naming the supported types."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for family in FAMILIES for t in family.model_types)
    raise ValueError(f"{model_name_or_path!r} is a {model_type!r} checkpoint; --model takes vision towers of these "
                     f"types: {supported}")


def tower_family(model_name_or_path: str, revision: str | None = None) -> type[Family]:
    """The `Family` of a checkpoint, from its ``config.json``'s ``model_type`` (the file only, never weights).

    Raises:
        ModelUnavailableError: the config cannot be found (see `operators.checkpoint.load_local_first`), or
            ``revision`` is a local folder's fingerprint and that folder is not here.
        ValueError: not a supported tower.
    """
    if is_local_directory(model_name_or_path, revision):
        revision = None  # a folder's fingerprint is checked where its weights are read (`load_pinned`)
    config_file = load_local_first(cached_file, model_name_or_path, revision, filename=CONFIG_NAME)
    if config_file is None:  # the hub cache records that the repository has no config.json at that revision
        raise ModelUnavailableError(f"{model_name_or_path!r} has no {CONFIG_NAME}.")
    with open(config_file) as handle:
        return family_of(json.load(handle).get("model_type", ""), model_name_or_path)


def describe_tower(model_name_or_path: str, revision: str | None = None) -> TowerInfo:
    """Read the tower's ``config.json`` and, when present, ``preprocessor_config.json`` (no weights).

    ``revision`` pins the checkpoint as in `operators.checkpoint.load_pinned` (a local directory's fingerprint
    check reads all its weights). Without a ``preprocessor_config.json`` the family's processor defaults
    apply at the tower's input size, with a warning.

    Raises:
        ModelUnavailableError: see `operators.checkpoint.load_pinned`.
        ValueError: not a supported tower (see `family_of`), a local directory whose fingerprint is not
            ``revision``, or an image processor whose rule or size the tower cannot take.
    """
    family = tower_family(model_name_or_path, revision)
    config = load_pinned(family.config_class.from_pretrained, model_name_or_path, revision)
    processor = processor_config(model_name_or_path, revision)
    return TowerInfo(
        family=family.name,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        cls_token=family.cls_token,
        has_probe=has_probe(family, config, model_name_or_path, revision),
        preprocessing=checkpoint_preprocessing(family, config, processor, model_name_or_path),
    )


def has_probe(family: type[Family], config: PretrainedConfig, model_name_or_path: str,
              revision: str | None = None) -> bool:
    """Whether the tower has SigLIP's attention-pooling head: its config says so and, when its weights are
    safetensors already here (names read from the header or the shard index, not the weights), they hold the
    head's probe (LLaVA-OneVision's tower is saved without it)."""
    if not family.declares_probe(config):
        return False
    names = local_weight_names(model_name_or_path, revision)
    return names is None or any(name.endswith("head.probe") for name in names)


def checkpoint_preprocessing(family: type[Family], config: PretrainedConfig, processor: dict | None,
                             model_name_or_path: str = "") -> Preprocessing:
    """The `Preprocessing` a checkpoint's image processor (``processor``, its ``preprocessor_config.json``; None:
    absent) prescribes for ``family``: crop (shortest side R, centre crop S) or squash (S×S), and mean/std.

    Without a processor config the family's processor defaults apply, at the tower's own size. The processor's
    ``resample`` is not followed: frames are always resized bicubic (antialiased).

    Raises:
        ValueError: a rule the job does not reproduce (non-square sizes, a squash followed by a crop), or a size
            the tower's fixed position embeddings cannot take.
    """
    if processor is None:
        logger.warning("%s has no %s: using the %s image processor's defaults (mean %s, std %s) at the tower's size",
                       model_name_or_path, PROCESSOR_CONFIG, family.name, family.processor["image_mean"],
                       family.processor["image_std"])
    settings = {**family.processor, **(processor or {})}
    size, crop = _side(settings.get("size")), _side(settings.get("crop_size"))
    if settings.get("do_center_crop"):
        if "shortest_edge" not in size or crop.get("height") is None or crop["height"] != crop.get("width"):
            raise _unsupported(model_name_or_path, settings)
        mode, resize, processed = "crop", size["shortest_edge"], crop["height"]
    elif family is Siglip2Family:  # NaFlex processors have no fixed size: the tower's grid decides
        mode, resize, processed = "squash", None, None
    elif size.get("height") is not None and size["height"] == size.get("width"):
        mode, resize, processed = "squash", None, size["height"]
    else:  # a shortest or longest side kept without a crop: no square input
        raise _unsupported(model_name_or_path, settings)
    if processor is None and family.fixed_size:  # the defaults' sizes are the processor class's, not this tower's
        processed = resize = None
    image_size = family.input_size(config, processed, model_name_or_path)  # SigLIP so400m: 384 px, 27 patches of 14
    return Preprocessing(mode=mode, image_size=image_size, resize_size=resize,
                         mean=_per_channel(settings["image_mean"]), std=_per_channel(settings["image_std"]))


def _per_channel(value) -> tuple[float, float, float]:
    """A processor's ``image_mean`` / ``image_std``: three values, or one for all channels."""
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def _side(size) -> dict:
    """A processor's ``size`` / ``crop_size`` as a dict (a legacy int: that shortest edge, or that square)."""
    if isinstance(size, int):
        return {"shortest_edge": size, "height": size, "width": size}
    return size if isinstance(size, dict) else {}


def _unsupported(model_name_or_path: str, settings: dict) -> ValueError:
    return ValueError(f"{model_name_or_path!r}: its image processor's resize rule (size {settings.get('size')}, "
                      f"center crop {settings.get('do_center_crop')}, crop size {settings.get('crop_size')}) is not one "
                      "the job reproduces (a shortest side then a square centre crop, or a square resize)")


def load_tower(model_name_or_path: str, family: type[Family], dtype: torch.dtype, revision: str | None,
               keep_blocks: int, probe: bool) -> PreTrainedModel:
    """Load the tower with only the modules the encoder runs: the embeddings, the first ``keep_blocks`` blocks,
    and with ``probe`` the final norm and the attention-pooling head. Exactly ``revision`` when given (see
    `operators.checkpoint.resolve_revision`).

    A full checkpoint's other weights (a CLIP text tower, a classifier, a pooler, later blocks) are left out on
    purpose, so transformers' load report, which lists each of them, is not shown; what that report exists to
    warn about is checked here instead: every weight of the modules kept must come from the checkpoint.

    Raises:
        ModelUnavailableError: the checkpoint (at ``revision``) cannot be found.
        ValueError: weights the encoder runs are missing or have other shapes in the checkpoint (the tower would
            run with random values for them); or a local directory whose fingerprint is not ``revision``.
    """
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one per encoder actor, in every run's console
    try:
        model, info = load_pinned(family.model_class.from_pretrained, model_name_or_path, revision, dtype=dtype,
                                  output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    family.set_blocks(model, family.blocks(model)[:keep_blocks])
    for name in ("pooler", "layernorm", *(() if probe else ("post_layernorm", "head"))):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, None)  # never run: their weights need not be in the checkpoint
    if getattr(model.embeddings, "mask_token", None) is not None:
        model.embeddings.mask_token = None  # ViT's / DINOv2's masked-image-modelling token: never used here
    kept = model.state_dict().keys()
    absent = sorted(k for k in info["missing_keys"] if k in kept)
    absent += sorted(str(k) for k in info["mismatched_keys"] if (k[0] if isinstance(k, tuple) else k) in kept)
    if absent:
        listed = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise ValueError(f"{model_name_or_path!r} is not a complete {family.name} vision checkpoint: weights the "
                         f"encoder runs are missing or of other shapes: {listed}")
    return model
