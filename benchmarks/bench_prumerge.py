"""PruMerge cost: the vectorised operator vs a per-token loop shaped like the published code, and vs the encoder.

Prints, measured side by side in one run:
  * per-frame time of `operators.prumerge.prumerge` at batch B (default 16) on 576x1024 inputs,
  * per-frame time of a loop structured like LLaVA-PruMerge's published merge (one cosine row and one
    top-k per kept token) on the same inputs and the same kept sets, and the speed-up,
  * the operator's time as a fraction of a ViT-L/14-336 forward (random weights, `VisionEncoder`,
    layer -2) on the same batch.

    python benchmarks/bench_prumerge.py                 # CPU, batch 16
    python benchmarks/bench_prumerge.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

from operators.encode import VisionEncoder
from operators.prumerge import prumerge, select_tokens
from towers import save_tower

NUM_PATCHES = 576  # 24 x 24 patches of a 336-px image with 14-px patches
WIDTH = 1024  # ViT-L hidden size


def synthetic_batch(batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random features/keys and softmax CLS attention whose IQR outliers are ~8% of the patches.

    Softmax of standard-normal logits is log-normal, with Q3 + 1.5·IQR at about e^1.42·σ: about 45 of
    576 outliers for PruMerge and, with the spatial samples, about 190 kept for PruMerge+.
    """
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, NUM_PATCHES, WIDTH, generator=generator)
    keys = torch.randn(batch, NUM_PATCHES, WIDTH, generator=generator)
    cls_attn = torch.randn(batch, NUM_PATCHES + 1, generator=generator).softmax(dim=-1)[:, 1:]
    return features.to(device, dtype), keys.to(device, dtype), cls_attn.to(device)


def published_style_merge(features, keys, scores, kept, k_neighbors=32):
    """The published merge loop: per kept token, a cosine row against all other tokens and a top-k."""
    unit_keys = F.normalize(keys, dim=-1)
    outputs = []
    for b in range(features.shape[0]):
        kept_index = kept[b].nonzero().flatten()
        merged = features[b, kept_index].clone()
        for row, i in enumerate(kept_index.tolist()):
            rest_keys = torch.cat([unit_keys[b, :i], unit_keys[b, i + 1 :]])
            rest_x = torch.cat([features[b, :i], features[b, i + 1 :]])
            rest_scores = torch.cat([scores[b, :i], scores[b, i + 1 :]])
            similarity = unit_keys[b, i][None] @ rest_keys.T  # [1, N-1]
            neighbours = similarity.topk(k_neighbors, dim=1).indices[0]
            merged[row] += (rest_x[neighbours] * rest_scores[neighbours, None]).sum(dim=0)
        extra = (features[b, ~kept[b]] * scores[b, ~kept[b], None]).sum(dim=0, keepdim=True)
        outputs.append(torch.cat([merged, extra]))
    return outputs


def median_seconds(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=3)
    parser.add_argument("--skip-encoder", action="store_true", help="do not time the ViT-L/14-336 forward")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, dtype {dtype}")
    features, keys, cls_attn = synthetic_batch(args.batch, device, dtype)
    per_frame = {}
    for mode in ("prumerge", "prumerge+"):
        kept = select_tokens(cls_attn, mode)
        vectorised = median_seconds(lambda: prumerge(features, keys, cls_attn, mode=mode), device, args.repeats)
        loop = median_seconds(
            lambda: published_style_merge(features.float(), keys.float(), cls_attn, kept), device, args.loop_repeats
        )
        per_frame[mode] = vectorised / args.batch
        print(
            f"{mode:10s} kept/frame {kept.sum(1).float().mean():6.1f}  "
            f"vectorised {1e3 * vectorised / args.batch:8.2f} ms/frame  "
            f"published-style loop {1e3 * loop / args.batch:8.2f} ms/frame  "
            f"speed-up {loop / vectorised:6.1f}x"
        )

    if args.skip_encoder:
        return
    with tempfile.TemporaryDirectory() as model_dir:
        encoder = VisionEncoder(str(save_tower(model_dir, "vit-l")), device=device, dtype=dtype)
    pixels = torch.randn(args.batch, 3, 336, 336)
    encode = median_seconds(lambda: encoder(pixels), device, max(1, args.repeats // 2))
    print(f"ViT-L/14-336 forward (layer -2, one pass) {1e3 * encode / args.batch:8.1f} ms/frame at batch {args.batch}")
    for mode, seconds in per_frame.items():
        print(f"{mode:10s} cost / encoder forward: {100 * seconds * args.batch / encode:.2f}%")


if __name__ == "__main__":
    main()
