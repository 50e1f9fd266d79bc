"""Run a vision tower once per batch and return everything token reduction needs.

LLaVA feeds its projector the hidden states of the penultimate layer (``layer=-2``; LLaVA-OneVision and
LLaVA-Video drop SigLIP's last block and its head and take the output of the block before: the same states).
PruMerge scores those tokens by the attention of the *next* block and merges them by that block's keys, which
come from the block's pre-attention norm → ``k_proj``. So one pass through the embeddings and the first ``L``
blocks, plus projections of the block that follows, yields all of it; later blocks are never run (LLaVA
discards their output) and are dropped at load time (`operators.towers.load_tower`).

Importance rules (``importance``), each ``[B, N]`` float32, a distribution over the patches (or, with a CLS
token, the patches' share of one):

* ``cls``: PruMerge's published score, ``softmax(q_cls·kᵀ/√C)`` with the full-width projections of the
  scoring block, over the CLS token and the patches; the CLS column dropped. CLS towers only.
* ``cls_head_mean``: the scoring block's true attention probabilities of the CLS query, averaged over heads.
* ``probe``: SigLIP's attention-pooling head: its learnt probe query's attention over the selected layer's
  output after the tower's final norm (``post_layernorm``), averaged over heads: the rule FastVID
  (arXiv 2503.11187) uses on LLaVA-OneVision. Towers with that head only.
* ``mean_received``: the attention each patch receives in the scoring block, averaged over heads and over all
  queries (CLS included): the rule HoliTom (arXiv 2505.21334) and FlashVID use on SigLIP.

Cost beyond the ``L`` blocks, per frame of T tokens of width C (FLOPs counted; one block is about
``2T(4C² + 2C·I) + 4T²C`` with MLP width I): every rule projects the keys (``2TC²``); ``cls`` and
``cls_head_mean`` add one query; ``mean_received`` adds all queries and their scores (``2TC² + 2T²C``);
``probe`` adds the final norm and the head's key projection (``2TC²``). For SigLIP so400m/14-384 (T = 729,
C = 1152, I = 4304) a block is 24.6 GFLOP: keys 1.9 (8 % of a block), ``mean_received`` 5.1 (21 %),
``probe`` 3.9 (16 %), against 26 blocks run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from operators.checkpoint import load_local_first
from operators.towers import (Importance, check_importance, default_importance, has_probe, load_tower, resolve_layer,
                              tower_family)

DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"


@dataclass(frozen=True)
class EncoderOutput:
    """What one forward pass yields for a batch of B frames/tiles with N patches of width C."""

    features: torch.Tensor  # [B, N, C] hidden states of the selected layer, patch tokens only
    keys: torch.Tensor  # [B, N, C] k_proj of the block consuming those states, patch tokens only
    importance: torch.Tensor  # [B, N] float32, the importance rule's score of each patch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # LLaVA runs its tower in fp16 on GPUs; CPUs have no fast half-precision matmul.
    return torch.float16 if device.type == "cuda" else torch.float32


class VisionEncoder:
    """Callable that maps preprocessed pixels ``[B, 3, S, S]`` to an `EncoderOutput` in one pass.

    Args:
        model_name_or_path: hub id or local directory of a checkpoint of any `operators.towers.FAMILIES` tower.
        layer: index into the tower's hidden states (0 = embeddings, -1 = last block's output), as in
            ``output_hidden_states``. Default -2, the layer LLaVA uses. The block after it must exist,
            since it supplies the keys (and the attention of the CLS rules), so -1 is rejected.
        device: where the tower runs; default CUDA when available, else CPU.
        dtype: tower weights' dtype; default fp16 on CUDA, fp32 on CPU.
        importance: one of `operators.towers.IMPORTANCE_RULES` (see the module docstring); default ``cls`` for
            towers with a CLS token, else ``probe`` when the checkpoint has SigLIP's head, else ``mean_received``.
        revision: load exactly this revision of it (see `operators.checkpoint.resolve_revision`: a hub commit
            hash, branch or tag, or a local directory's fingerprint, checked after loading); None: whatever
            `operators.checkpoint.load_local_first` finds.

    Raises:
        ModelUnavailableError, ValueError: see `operators.towers.load_tower`; ValueError also for ``layer`` out of
            range, an unsupported tower, or an ``importance`` rule this tower cannot compute.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        layer: int = -2,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        importance: Importance | None = None,
        revision: str | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.model_name_or_path = model_name_or_path
        self.revision = revision
        self.family = tower_family(model_name_or_path, revision)
        config = load_local_first(self.family.config_class.from_pretrained, model_name_or_path, revision)
        probe = has_probe(self.family, config, model_name_or_path, revision)
        self.importance = importance or default_importance(self.family.cls_token, probe)
        check_importance(self.importance, self.family.name, self.family.cls_token, probe)

        self.layer = resolved = resolve_layer(layer, config.num_hidden_layers)
        # blocks[:L] to run plus block L for its norm and projections; later blocks are never used.
        model = load_tower(model_name_or_path, self.family, self.dtype, revision, keep_blocks=resolved + 1,
                           probe=self.importance == "probe")
        self.model = model.to(self.device).eval()
        self.prefix = 1 if self.family.cls_token else 0  # tokens before the patches
        self.hidden_size: int = config.hidden_size
        self.num_heads: int = config.num_attention_heads

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """Encode ``pixel_values [B, 3, S, S]`` (already resized and normalised for the model)."""
        pixels = pixel_values.to(self.device, self.dtype, non_blocking=True)
        hidden = self.family.embed(self.model, pixels)  # [B, P+N, C]
        blocks = self.family.blocks(self.model)
        for block in blocks[: self.layer]:
            hidden = block(hidden, None)  # [B, P+N, C]

        scoring_block = blocks[self.layer]
        attention = self.family.attention(scoring_block)
        normed = self.family.attention_norm(scoring_block)(hidden)
        keys = attention.k_proj(normed)  # [B, P+N, C]
        features = hidden[:, self.prefix :]
        if self.importance == "probe":
            importance = self._probe_attention(features)
        elif self.importance == "cls":
            cls_query = attention.q_proj(normed[:, :1]).float()  # [B, 1, C]
            logits = torch.einsum("bqc,bnc->bn", cls_query, keys.float()) / math.sqrt(keys.shape[-1])
            importance = logits.softmax(dim=-1)[:, self.prefix :]
        else:
            queries = attention.q_proj(normed if self.importance == "mean_received" else normed[:, :1])
            importance = self._head_mean_attention(queries, keys)[:, self.prefix :]
        return EncoderOutput(features=features, keys=keys[:, self.prefix :], importance=importance)

    def _head_mean_attention(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``queries [B, Q, C]``' per-head attention probabilities over ``keys [B, T, C]``, averaged over heads and
        queries: ``[B, T]`` float32. One head at a time, so at most ``[B, Q, T]`` scores are held."""
        heads_q = rearrange(queries.float(), "b q (h d) -> h b q d", h=self.num_heads)
        heads_k = rearrange(keys.float(), "b t (h d) -> h b t d", h=self.num_heads)
        scale = heads_q.shape[-1] ** -0.5
        total = torch.zeros(keys.shape[:2], device=keys.device)
        for head_q, head_k in zip(heads_q, heads_k):
            total += (head_q @ head_k.transpose(1, 2) * scale).softmax(dim=-1).mean(dim=1)
        return total / self.num_heads

    def _probe_attention(self, features: torch.Tensor) -> torch.Tensor:
        """SigLIP's pooling head: its probe query's attention over ``post_layernorm(features [B, N, C])``,
        averaged over heads: ``[B, N]`` float32."""
        head = self.model.head.attention  # torch.nn.MultiheadAttention, q/k/v packed in in_proj_weight
        weight_q, weight_k, _ = head.in_proj_weight.chunk(3)
        bias_q, bias_k, _ = head.in_proj_bias.chunk(3)
        probe = F.linear(self.model.head.probe, weight_q, bias_q).expand(len(features), 1, -1)  # [B, 1, C]
        keys = F.linear(self.model.post_layernorm(features), weight_k, bias_k)  # [B, N, C]
        return self._head_mean_attention(probe, keys)
