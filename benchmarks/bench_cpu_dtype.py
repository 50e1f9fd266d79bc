"""bf16 vs fp32 on this CPU (issue #14): does bf16 keep a real ViT's features, and is it faster here?

Accuracy, with a real trained ViT (a Hugging Face `ViTModel` checkpoint, e.g. the ViT-Ti/16 in
``../shared/models/``) run through the job's own `operators.encode.VisionEncoder` (which loads CLIP, SigLIP,
SigLIP 2, ViT and DINOv2 towers; the CLIP-only `ClipEncoder` it replaced no longer exists, and with it the
copy of its computation this benchmark used to carry for ViTs) on real frames: ``--frames`` uniform frames
of each clip in ``tests/data/videos`` that decodes (the job's PyAV reader), prepared with the tower's own
preprocessing as the job prepares them (`operators.towers.describe_tower`: its ``preprocessor_config.json``
when present, else its family's image-processor defaults; for the ViT-Ti, which has none, a 224-px squash
and mean = std = 0.5, as its README states). The tower is loaded in float32, bfloat16 and float16 (fp16, the
encoder's GPU default, is run on this CPU only as a yardstick for the size of the differences), each dtype
as two encoders at layer -2 that differ only in their importance rule, and yields what the job hands to
PruMerge (`VisionEncoder`'s outputs; ``tests/test_encode.py`` checks them against the model's own hidden
states, projections and attention probabilities):

  * features: the hidden states that enter the last block (``hidden_states[-2]``), patch tokens only;
  * keys: that block's ``k_proj`` applied to its LayerNorm'd input, patch tokens only;
  * CLS attention: ``importance="cls"``, ``softmax(q_cls·kᵀ/√C)`` with the full-width projections (the
    encoder's default for CLS towers, the published PruMerge score; "full_width" below), CLS column dropped;
    the per-head mean, ``importance="cls_head_mean"`` ("head_mean"), is reported too.

Printed, bf16 and fp16 against fp32: per-token cosine similarity of features and of keys (min, 0.1 %
quantile, median over all patch tokens of all frames, and how many tokens fall below ``--tolerance``;
plus fp32 features merely rounded to bf16, the cost of bf16 storage alone); for the
CLS attention the max absolute difference, the top-10 overlap and the Spearman rank correlation per
frame; and for `operators.prumerge.prumerge` (modes "prumerge" and "prumerge+") the Jaccard overlap of
the kept patch positions per frame (mean, min, frames with the identical set).

Speed: wall time of a forward pass at batch ``--batch`` (default 8) with ``--threads`` torch threads
(default 2), per frame, fp32 vs bf16 (median and min of ``--repeats`` rounds after a warm-up, the two
dtypes alternating within each round so that other load on the machine falls on both alike), for
(a) the real ViT's ``importance="cls"`` encoder above (the job's default for it) and (b) a random-weight
CLIP vision tower of ViT-B width and depth on a 336-px, 14-px-patch grid (``towers.py``'s "vit-b14",
576 patches) through `VisionEncoder` too (layer -2, its default ``cls`` rule, batch of random pixels).

    python benchmarks/bench_cpu_dtype.py --model ../shared/models/vit-tiny-patch16-224
    python benchmarks/bench_cpu_dtype.py --model DIR --frames 4 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.checkpoint import PROCESSOR_CONFIG  # noqa: E402
from operators.decode import DecodedFrame, VideoReader  # noqa: E402
from operators.errors import MediaError  # noqa: E402
from operators.encode import VisionEncoder  # noqa: E402
from operators.preprocess import Preprocessing  # noqa: E402
from operators.prumerge import EXTRA_TOKEN_POSITION, prumerge  # noqa: E402
from operators.sampling import uniform_indices  # noqa: E402
from operators.towers import describe_tower  # noqa: E402
from towers import save_tower  # noqa: E402

VIDEOS = ROOT / "tests" / "data" / "videos"
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
RULES = ("cls", "cls_head_mean")  # the two CLS importance rules compared: full width (the default), head mean


@dataclass(frozen=True)
class Outputs:
    """What the encoder hands to PruMerge for F frames with N patches of width C (float32 copies)."""

    features: torch.Tensor  # [F, N, C]
    keys: torch.Tensor  # [F, N, C]
    cls_full: torch.Tensor  # [F, N] full-width CLS attention (importance="cls", the encoder's default)
    cls_heads: torch.Tensor  # [F, N] CLS attention averaged over heads (importance="cls_head_mean")


def cpu_flags() -> dict[str, bool]:
    """Which of `CPU_FLAGS` /proc/cpuinfo lists."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        words = set()
    return {flag: flag in words for flag in CPU_FLAGS}


def real_frames(prep: Preprocessing, frames_per_clip: int) -> tuple[torch.Tensor, list[str]]:
    """``[F, 3, S, S]`` float32 model input: ``frames_per_clip`` uniform frames of each clip that decodes,
    and each frame's label ``clip#frame``."""
    batches, labels = [], []
    for path in sorted(VIDEOS.iterdir()):
        try:
            with VideoReader(str(path)) as reader:
                indices = uniform_indices(reader.info.num_frames, frames_per_clip)
                decoded = [f for f in reader.frames(indices, prep.decode_size) if isinstance(f, DecodedFrame)]
        except MediaError as error:
            print(f"  skipped {path.name}: {error}")
            continue
        if decoded:
            batches.append(prep(np.stack([f.pixels for f in decoded])))
            labels += [f"{path.name}#{f.index}" for f in decoded]
    return torch.cat(batches), labels


def load_encoders(model_dir: Path, dtype: torch.dtype) -> dict[str, VisionEncoder]:
    """The checkpoint as one `VisionEncoder` (layer -2, CPU, ``dtype``) per rule of `RULES`."""
    return {rule: VisionEncoder(str(model_dir), device="cpu", dtype=dtype, importance=rule) for rule in RULES}


def encode_all(encoders: dict[str, VisionEncoder], pixels: torch.Tensor, batch: int) -> Outputs:
    """Both encoders over ``pixels`` in batches of ``batch``: features and keys of the ``cls`` one (the two
    share them), each one's importance; concatenated, as float32."""
    parts = []
    for i in range(0, len(pixels), batch):
        full, heads = (encoders[rule](pixels[i : i + batch]) for rule in RULES)
        parts.append(Outputs(full.features.float(), full.keys.float(), full.importance, heads.importance))
    return Outputs(*(torch.cat([getattr(p, name) for p in parts]) for name in Outputs.__dataclass_fields__))


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token ``[F, N, C]`` → ``[F·N]`` float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).flatten()


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row (0 = smallest), as float64."""
    return x.argsort(dim=-1).argsort(dim=-1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman correlation of ``[F, N]`` scores (ranks by sort order; ties are not averaged)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(dim=-1, keepdim=True), rb - rb.mean(dim=-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per-row fraction of the top-``k`` positions of ``a`` that are also in the top-``k`` of ``b``."""
    top_a, top_b = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    return (top_a[:, :, None] == top_b[:, None, :]).any(-1).double().mean(-1)


def kept_jaccard(reference: Outputs, other: Outputs, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame Jaccard overlap of PruMerge's kept positions, and the kept counts of each run."""
    kept = []
    for out in (reference, other):
        reduced = prumerge(out.features, out.keys, out.cls_full, mode=mode)
        kept.append([set(p[p != EXTRA_TOKEN_POSITION].tolist()) for p in reduced.positions])
    jaccard = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in zip(*kept)]
    return np.array(jaccard), np.array([len(a) for a in kept[0]]), np.array([len(b) for b in kept[1]])


def interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each of ``runs`` over ``repeats`` rounds, after one warm-up round; the cases alternate
    within each round, so load from other processes on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def row(name: str, *values: str) -> None:
    print(f"  {name:<46}" + "".join(f"{v:>12}" for v in values))


def cosine_rows(ref: Outputs, others: dict[str, Outputs], tolerance: float) -> dict[str, torch.Tensor]:
    """Print per-token cosine statistics of features and keys for each dtype; return the feature cosines."""
    row("per-token cosine vs fp32", "min", "q0.1%", "median", f"<{tolerance}")
    feature_cosines = {}
    for name in ("features", "keys"):
        for dtype, out in others.items():
            cos = token_cosine(getattr(ref, name), getattr(out, name))
            if name == "features":
                feature_cosines[dtype] = cos
            row(f"{name}, {dtype}", f"{cos.min():.6f}", f"{torch.quantile(cos, 0.001):.6f}", f"{cos.median():.6f}",
                f"{int((cos < tolerance).sum())}")
    rounded = token_cosine(ref.features, ref.features.bfloat16())
    row("features, fp32 rounded to bf16 (storage only)", f"{rounded.min():.6f}",
        f"{torch.quantile(rounded, 0.001):.6f}", f"{rounded.median():.6f}", f"{int((rounded < tolerance).sum())}")
    return feature_cosines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face ViTModel checkpoint directory")
    parser.add_argument("--frames", type=int, default=8, help="uniform frames per clip (default 8)")
    parser.add_argument("--tolerance", type=float, default=0.999, help="per-token cosine bound (default 0.999)")
    parser.add_argument("--batch", type=int, default=8, help="frames per forward pass when timing (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flags = ", ".join(f"{flag}={'yes' if present else 'no'}" for flag, present in cpu_flags().items())
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, threads "
          f"{torch.get_num_threads()}; /proc/cpuinfo: {flags}")

    encoders = {name: load_encoders(args.model, dtype)
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    tower = describe_tower(str(args.model))
    prep = tower.preprocessing
    source = (PROCESSOR_CONFIG if (args.model / PROCESSOR_CONFIG).is_file()
              else f"the {tower.family} image processor's defaults (no {PROCESSOR_CONFIG})")
    pixels, labels = real_frames(prep, args.frames)
    clips = sorted({label.split("#")[0] for label in labels})
    print(f"model {args.model} ({tower.num_layers} blocks, width {tower.hidden_size}, {tower.num_heads} heads, "
          f"{tower.grid_size ** 2} patches); {prep.mode} {prep.image_size} px, mean/std {prep.mean}/{prep.std} "
          f"from {source}")
    print(f"frames {len(pixels)} from {len(clips)} clips: "
          + " ".join(f"{c}:{sum(label.startswith(c + '#') for label in labels)}" for c in clips))

    outputs = {name: encode_all(pair, pixels, args.batch) for name, pair in encoders.items()}
    ref = outputs.pop("fp32")
    print("fp16 (the GPU default dtype) is run on this CPU as a reference for the size of the difference, not timed")

    print(f"\naccuracy vs fp32, {len(pixels)} frames, {ref.features.shape[0] * ref.features.shape[1]} patch tokens")
    feature_cosines = cosine_rows(ref, outputs, args.tolerance)
    num_patches = ref.features.shape[1]
    worst = int(feature_cosines["bf16"].argmin())
    norms = ref.features.norm(dim=-1).flatten()
    print(f"  worst bf16 feature token: {labels[worst // num_patches]}, patch {worst % num_patches} "
          f"(norm {norms[worst]:.1f}; median token norm {norms.median():.1f})")
    key_cosine_min = float(token_cosine(ref.keys, outputs["bf16"].keys).min())

    print()
    row("CLS attention vs fp32, per frame", "max|diff|", "top10 mean", "top10 min", "spear. mean", "spear. min")
    for dtype, out in outputs.items():
        for name, a, b in (("full_width", ref.cls_full, out.cls_full), ("head_mean", ref.cls_heads, out.cls_heads)):
            overlap, rho = topk_overlap(a, b), spearman(a, b)
            row(f"{name}, {dtype}", f"{(a - b).abs().max():.2e}", f"{overlap.mean():.3f}", f"{overlap.min():.3f}",
                f"{rho.mean():.5f}", f"{rho.min():.5f}")

    print()
    row("PruMerge kept positions vs fp32 (full_width)", "J mean", "J min", "identical", "kept fp32", "kept other")
    jaccards = {}
    for mode in ("prumerge", "prumerge+"):
        for dtype, out in outputs.items():
            jaccard, kept_ref, kept_other = kept_jaccard(ref, out, mode)
            jaccards[mode, dtype] = jaccard
            row(f"{mode}, {dtype}", f"{jaccard.mean():.4f}", f"{jaccard.min():.4f}",
                f"{int((jaccard == 1).sum())}/{len(jaccard)}", f"{kept_ref.mean():.1f}", f"{kept_other.mean():.1f}")
            lowest = int(jaccard.argmin())
            print(f"    lowest: {labels[lowest]}, kept {kept_ref[lowest]} (fp32) vs {kept_other[lowest]} ({dtype}); "
                  f"kept count differs in {int((kept_ref != kept_other).sum())}/{len(jaccard)} frames")

    print(f"\nspeed: batch {args.batch}, {args.threads} threads, {args.repeats} rounds after a warm-up, fp32 and bf16 "
          f"alternating; ms per frame; load average before: {Path('/proc/loadavg').read_text().split()[0]}")
    row("", "fp32 median", "bf16 median", "fp32 min", "bf16 min", "speed-up")
    batch = pixels[: args.batch]
    speedups = {}

    def report(key: str, name: str, times: dict[str, list[float]]) -> None:
        med = {dtype: statistics.median(t) for dtype, t in times.items()}
        best = {dtype: min(t) for dtype, t in times.items()}
        speedups[key] = med["fp32"] / med["bf16"]
        row(name, *(f"{1e3 * v / args.batch:.1f}" for v in (med["fp32"], med["bf16"], best["fp32"], best["bf16"])),
            f"{speedups[key]:.2f}x")

    report("vit", f"real ViT ({tower.num_layers} blocks, {tower.image_size} px)", interleaved_seconds(
        {dtype: (lambda e=encoders[dtype]["cls"]: e(batch)) for dtype in ("fp32", "bf16")}, args.repeats))
    del encoders
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        save_tower(directory, "vit-b14")
        tower_pixels = torch.randn(args.batch, 3, 336, 336, generator=torch.Generator().manual_seed(0))
        encoders = {"fp32": VisionEncoder(directory, device="cpu", dtype=torch.float32),
                    "bf16": VisionEncoder(directory, device="cpu", dtype=torch.bfloat16)}
        report("vitb", "ViT-B/14-336 CLIP tower, random (VisionEncoder)", interleaved_seconds(
            {dtype: (lambda e=encoder: e(tower_pixels)) for dtype, encoder in encoders.items()}, args.repeats))
    print(f"  load average after: {Path('/proc/loadavg').read_text().split()[0]}")

    bf16_min = float(feature_cosines["bf16"].min())
    print(f"\nbf16_min_token_cosine={bf16_min:.6f} bf16_min_key_cosine={key_cosine_min:.6f} "
          f"fp16_min_token_cosine={feature_cosines['fp16'].min():.6f} "
          f"within_{args.tolerance}={bf16_min >= args.tolerance} "
          f"bf16_prumerge_jaccard_mean={jaccards['prumerge', 'bf16'].mean():.4f} "
          f"bf16_prumerge_jaccard_min={jaccards['prumerge', 'bf16'].min():.4f} "
          f"bf16_speedup_vit={speedups['vit']:.2f} bf16_speedup_vitb={speedups['vitb']:.2f}")


if __name__ == "__main__":
    main()
