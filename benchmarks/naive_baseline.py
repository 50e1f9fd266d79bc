"""The yardstick: the short script a user would write instead of this project.

Loop over the videos; decode N uniformly sampled frames with decord; preprocess them with the
model's CLIP image processor; run `CLIPVisionModel` once per video (all frames in one batch, under
`torch.inference_mode`) with `output_hidden_states=True` and hooks on the last block's q/k
projections, as the published LLaVA-PruMerge code does; reduce with the published PruMerge
(batch-pooled IQR ratio, top-k, per-token merge loop); save each video's rows with pandas.

The processor is `CLIPImageProcessorPil` (the PIL-backed `CLIPImageProcessor` of transformers 5):
the torchvision-backed one does not install beside the CPU torch build here.

    python benchmarks/naive_baseline.py --input DIR --output OUT --model PATH [--num-frames 8] [--dtype bfloat16]
    python benchmarks/naive_baseline.py ... --device cuda --dtype float16     # on a GPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import decord
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm"}


def outlier_ratio(cls_attn: torch.Tensor) -> float:
    """Published `outlier_dectection`: IQR upper outliers over the whole batch, as a fraction."""
    values = cls_attn.float().cpu().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return float((values > q3 + 1.5 * (q3 - q1)).sum() / len(values))


def published_prumerge(features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, k: int = 32) -> torch.Tensor:
    """Published `token_prune_merge_advanced` after the forward: ``features [B, N, C]`` (patches),
    ``keys [B, N+1, C]`` (with CLS), ``cls_attn [B, N]`` → ``[B, kept+1, C]``."""
    batch, n, channels = features.shape
    left = int(n * outlier_ratio(cls_attn))
    _, idx = torch.topk(cls_attn, left, dim=1, largest=True)  # [B, left], sorted
    keys = keys[:, 1:]
    gather = lambda x, i: torch.gather(x, 1, i.unsqueeze(-1).expand(-1, -1, channels))  # noqa: E731
    rest = torch.stack([torch.from_numpy(np.setdiff1d(np.arange(n), row.cpu().numpy())) for row in idx]).to(idx.device)
    x_kept, k_kept, a_kept = gather(features, idx), gather(keys, idx), torch.gather(cls_attn, 1, idx)
    x_rest, k_rest, a_rest = gather(features, rest), gather(keys, rest), torch.gather(cls_attn, 1, rest)
    k_kept, k_rest = F.normalize(k_kept, dim=-1), F.normalize(k_rest, dim=-1)
    merged = torch.zeros_like(x_kept)
    for b in range(batch):
        for i in range(left):
            others_x = torch.cat([x_kept[b, :i], x_kept[b, i + 1 :], x_rest[b]])
            others_a = torch.cat([a_kept[b, :i], a_kept[b, i + 1 :], a_rest[b]])
            others_k = torch.cat([k_kept[b, :i], k_kept[b, i + 1 :], k_rest[b]])
            similarity = k_kept[b, i][None] @ others_k.T  # [1, N-1]
            cluster = similarity.topk(min(k, len(others_k)), dim=1).indices[0]
            merged[b, i] = (others_x[cluster] * others_a[cluster, None]).sum(0) + x_kept[b, i]
    extra = (x_rest * a_rest.unsqueeze(-1)).sum(1, keepdim=True)  # [B, 1, C]
    return torch.cat([merged, extra], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model = CLIPVisionModel.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    size = model.config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    captured = {}
    last = model.encoder.layers[-1].self_attn  # transformers 5 layout (4.x: model.vision_model.encoder)
    last.q_proj.register_forward_hook(lambda module, inputs, output: captured.__setitem__("q", output))
    last.k_proj.register_forward_hook(lambda module, inputs, output: captured.__setitem__("k", output))

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    frames_done, failed, started = 0, 0, time.time()
    for path in sorted(p for p in Path(args.input).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
            indices = np.linspace(0, len(reader) - 1, min(args.num_frames, len(reader))).astype(int)
            frames = reader.get_batch(indices).asnumpy()
            timestamps = reader.get_frame_timestamp(indices)[:, 0]
        except Exception as error:  # noqa: BLE001 - a bad video is skipped, as a user script would
            print(f"skip {path.name}: {error}")
            failed += 1
            continue
        pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"].to(args.device, dtype)
        with torch.inference_mode():
            out = model(pixel_values=pixels, output_hidden_states=True)
            features = out.hidden_states[-2][:, 1:]  # [B, N, C]
            q, k = captured["q"], captured["k"]  # [B, N+1, C]
            attention = ((q @ k.transpose(-2, -1)) * k.shape[-1] ** -0.5).float().softmax(dim=-1)
            tokens = published_prumerge(features, k, attention[:, 0, 1:])  # [B, kept+1, C]
        rows = [
            {"video": path.name, "frame_index": int(i), "timestamp_s": float(t),
             "tokens": tokens[j].to(torch.float16).cpu().numpy().ravel()}
            for j, (i, t) in enumerate(zip(indices, timestamps))
        ]
        pd.DataFrame(rows).to_parquet(output / f"{path.stem}.parquet")
        frames_done += len(rows)
    wall = time.time() - started
    print(f"baseline: {frames_done} frames, {failed} videos skipped, {wall:.1f} s, {frames_done / wall:.2f} frames/s")


if __name__ == "__main__":
    main()
