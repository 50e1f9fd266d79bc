"""The one configuration object of an encoding run; the command-line flags map onto its fields 1:1."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from operators.decode import DEFAULT_MAX_FRAME_PIXELS
from operators.encode import DEFAULT_MODEL
from operators.images import DEFAULT_MAX_PIXELS
from operators.methods import MethodSpec, parse_methods
from operators.preprocess import RESIZE_MODES, Preprocessing
from operators.sampling import FrameSampling
from operators.tiles import default_pinpoints
from operators.towers import IMPORTANCE_RULES, TowerInfo, resolve_layer
from pipeline.runlog import LEVELS


def _flag(help: str, default=None, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EncodeConfig:
    """Every knob of a run. `jobs/` builds its argparse flags from these fields and their help."""

    input: str = _flag("directory (searched recursively), glob, text file of paths, or Parquet/CSV file with a "
                       "'path' column; local or any filesystem URI pyarrow supports (s3://, gs://, hdfs://)")
    output: str = _flag("output directory (local or pyarrow filesystem URI): shards/, errors/, logs/, runs/, "
                        "manifest.json")
    media: Literal["video", "image"] = _flag("what the inputs are", "video", choices=("video", "image"))
    model: str = _flag("Hugging Face hub id or local path of a vision checkpoint: CLIP, SigLIP, SigLIP 2, ViT or DINOv2 "
                       "(a full CLIP/SigLIP checkpoint or its vision tower alone)", DEFAULT_MODEL)
    model_revision: str | None = _flag(
        "exact revision of --model: a hub commit hash, branch or tag (default: the revision found on the driver: "
        "the hub cache's commit, or a local folder's sha256 content fingerprint); every encoder loads exactly it "
        "and the output records it")
    layer: int = _flag("hidden-state index whose patch tokens are kept (LLaVA uses -2)", -2)
    num_frames: int | None = _flag("videos: frames sampled uniformly over the whole video", 8)
    fps: float | None = _flag("videos: sample this many frames per second instead of --num-frames")
    max_frames: int | None = _flag("videos: with --fps, at most this many frames (uniformly among the sampled)")
    key_frames: bool = _flag(
        "videos: take the key frame nearest to each sampled frame instead of the frame itself, when it is nearer "
        "to that frame than to its neighbours (and within --key-frame-tolerance-s): much cheaper decoding, "
        "frames up to that far from the sampled times; rows record the frame taken", False)
    key_frame_tolerance_s: float | None = _flag(
        "videos, with --key-frames: the farthest (seconds) a key frame may be from the sampled frame it replaces "
        "(default: no limit but the neighbouring sampled frames)")
    method: str = _flag(
        "token reduction: one or a comma-separated list of prumerge, prumerge+, fixed:K (K tokens per view "
        "plus one merged extra), holitom:R (HoliTom's temporal merging across the frames of a segment, keeping "
        "R of their patches); all from one encoder pass; with several, each goes to OUT/<method>/ (':' written "
        "'-')", "prumerge")
    budget: int | None = _flag("tokens kept per frame/tile with --method fixed (the same as fixed:K)")
    segment_frames: int = _flag("videos, with holitom: the sampled frames are cut into fixed segments of this many "
                                "consecutive ones, each encoded in one batch, reduced together and committed whole "
                                "(its temporal windows never cross a segment; memory grows with it)", 32)
    k_neighbors: int = _flag("neighbours (by key cosine similarity) merged into each kept token", 32)
    importance: Literal["cls", "cls_head_mean", "probe", "mean_received"] | None = _flag(
        "patch importance: 'cls' the CLS query's full-width attention in the block after --layer (PruMerge's); "
        "'cls_head_mean' its per-head attention, averaged; 'probe' SigLIP's pooling-head query's attention over "
        "the --layer states after the final norm; 'mean_received' the attention each patch receives from all "
        "queries in the block after --layer (default: cls for towers with a CLS token, probe for SigLIP)",
        choices=IMPORTANCE_RULES)
    preprocess: Literal["crop", "squash", "pad"] | None = _flag(
        "'crop': shortest side, centre crop (CLIP's processor); 'squash': resize to the square input (SigLIP's, "
        "ViT's); 'pad': LLaVA pad-to-square (default: the checkpoint's own image processor's rule)",
        choices=RESIZE_MODES)
    anyres: bool = _flag("split frames/images into LLaVA-NeXT AnyRes tiles plus a global view", False)
    pinpoints: str | None = _flag("AnyRes grid resolutions as WxH,WxH,..., each side a multiple of the tower's input "
                                  "size S (default: llava-v1.6's, S x 2S, 2S x S, 2S x 2S, 3S x S, S x 3S)")
    batch_size: int = _flag("frames per encoder batch (AnyRes frames count once, whatever their tiles)", 16)
    decode_timeout_s: float = _flag(
        "a decoder that makes no progress (reads or decodes no packet) for this many seconds is stopped as hung; "
        "the input's frames it did not deliver become error rows the next run tries again, with this limit "
        "doubled for each earlier decoder failure of the input (the third is for good)", 300.0)
    input_timeout_s: float = _flag(
        "the most seconds one input may spend in its decoder however much progress it reports (an endless "
        "stream); then it is stopped, and the next run tries it again with this limit doubled for each earlier "
        "decoder failure of the input (the third is for good)", 21600.0)
    num_decoders: int | None = _flag("decoder actors, one CPU each, each decoding one input at a time with one "
                                     "thread (default: the cluster's CPUs the encoders do not reserve)")
    num_encoders: int | None = _flag("encoder actors (default: one per GPU; on CPU one per node with room for it)")
    encoder_threads: int | None = _flag("CPU encoders: torch threads per actor, and the CPUs it reserves (default: "
                                        "it reserves a node's CPUs minus the decoder's one and runs a thread per core)")
    device: str | None = _flag("encoder device: cpu or cuda (default: cuda when the cluster has GPUs, else cpu, "
                               "with a warning); cuda waits for GPUs (--gpu-wait-s), never falls back to cpu")
    gpu_wait_s: float = _flag("with --device cuda on a cluster without GPUs: seconds to wait for GPU nodes (an "
                              "autoscaler is asked for them) before failing", 600.0)
    dtype: Literal["float32", "float16", "bfloat16"] | None = _flag(
        "encoder dtype (default: float16 on cuda, float32 on cpu)", None, choices=("float32", "float16", "bfloat16"))
    frames_per_shard: int = _flag("frames (each with all its views; holitom: segments, each with all its windows) "
                                  "gathered into one shard file (larger: fewer, bigger files; a write task holds this "
                                  "many in memory)", 1024)
    shard_mb: float = _flag("most megabytes of tokens per shard file; also caps --frames-per-shard at what fits "
                          "when every frame keeps its most tokens", 256.0)
    set_aside_damaged: bool = _flag("move committed files that cannot be read back whole to OUT/damaged/ and "
                                    "encode their frames again (without it such an output is refused)", False)
    max_image_pixels: int = _flag("images larger than this many pixels are refused as decompression bombs",
                                  DEFAULT_MAX_PIXELS)
    max_frame_pixels: int = _flag("videos whose frames are larger than this many pixels are refused",
                                  DEFAULT_MAX_FRAME_PIXELS)
    ray_address: str | None = _flag("Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _flag(
        "the job's messages at this level and above go to the console; OUT/logs/<run-id>.log always keeps INFO "
        "and above (DEBUG too when asked)", "INFO",
        choices=LEVELS)

    def __post_init__(self) -> None:
        if self.fps is not None:
            self.num_frames = None
        specs = self.methods()
        temporal = [spec.text for spec in specs if spec.temporal]
        if temporal and self.media != "video":
            raise ValueError(f"--method {temporal[0]} reduces across the frames of a video; images have one")
        if temporal and self.anyres:
            raise ValueError(f"--method {temporal[0]} reduces the global view of each frame across frames; it "
                             "does not take --anyres")
        for name in ("batch_size", "k_neighbors", "frames_per_shard", "max_image_pixels", "max_frame_pixels",
                     "num_decoders", "num_encoders", "segment_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        self.sampling()  # --num-frames / --fps / --max-frames out of range: refused now, not in every decoder
        if not 0 < self.shard_mb < float("inf"):
            raise ValueError("--shard-mb must be a positive number")
        for name in ("decode_timeout_s", "input_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
        if not self.gpu_wait_s >= 0:
            raise ValueError("--gpu-wait-s must be >= 0")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.encoder_threads is not None and self.encoder_threads < 1:
            raise ValueError("--encoder-threads must be >= 1")
        if self.pinpoints is not None:
            self.pinpoint_list()  # refuses a malformed --pinpoints now, not in every input's decoder

    def for_tower(self, tower: TowerInfo) -> EncodeConfig:
        """This config with what it leaves to the tower filled in (``importance``, ``preprocess``, ``pinpoints``),
        checked against what the tower can serve.

        Raises:
            ValueError: naming the flag: a layer the tower does not have (or its last), an importance rule it
                cannot compute, AnyRes pinpoints that are not whole multiples of its input size, or a fixed budget
                above its patches per view.
        """
        size = tower.image_size
        resolved = dataclasses.replace(
            self,
            importance=self.importance or tower.default_importance,
            preprocess=self.preprocess or tower.preprocessing.mode,
            pinpoints=self.pinpoints or ",".join(f"{w}x{h}" for w, h in default_pinpoints(size)))
        resolve_layer(self.layer, tower.num_layers)
        tower.check_importance(resolved.importance)
        if self.anyres:
            bad = [f"{w}x{h}" for w, h in resolved.pinpoint_list() if w % size or h % size]
            if bad:
                raise ValueError(f"--pinpoints {', '.join(bad)}: each side must be a multiple of the model's input "
                                 f"size {size} px (e.g. {size}x{2 * size})")
        patches = tower.grid_size**2
        for spec in self.methods():
            if spec.budget is not None and spec.budget > patches:
                given = f"--budget {self.budget}" if self.budget is not None else f"--method {spec.text}"
                raise ValueError(f"{given}: the model has {patches} patches per view; use 1..{patches}")
        return resolved

    def methods(self) -> tuple[MethodSpec, ...]:
        """``--method`` (with ``--budget``) as specs; raises ValueError naming the spec when malformed."""
        return parse_methods(self.method, self.budget)

    def segment_size(self) -> int:
        """Frames per segment row: ``segment_frames`` when a method reduces across frames, else 1 (per-frame
        methods need no frame of their neighbours, and one-frame rows batch exactly as ``batch_size`` says)."""
        return self.segment_frames if any(spec.temporal for spec in self.methods()) else 1

    def preprocessing(self, tower: TowerInfo) -> Preprocessing:
        """How frames become ``tower``'s input: its own rule, or ``preprocess`` when set (then a crop crops at S)."""
        if self.preprocess is None or self.preprocess == tower.preprocessing.mode:
            return tower.preprocessing
        return dataclasses.replace(tower.preprocessing, mode=self.preprocess, resize_size=tower.image_size)

    def sampling(self) -> FrameSampling:
        """The videos' frame sampling; raises ValueError (naming the flag) when out of range."""
        try:
            return FrameSampling(num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames,
                                 key_frames=self.key_frames, key_frame_tolerance_s=self.key_frame_tolerance_s)
        except ValueError as error:
            message = str(error)
            for name in ("num_frames", "max_frames", "key_frame_tolerance_s", "key_frames", "fps"):
                message = message.replace(name, "--" + name.replace("_", "-"))
            raise ValueError(message) from error

    def pinpoint_list(self) -> tuple[tuple[int, int], ...]:
        """``--pinpoints`` as ``((width, height), ...)``; raises ValueError when malformed or not positive, or not
        yet resolved (`for_tower`)."""
        if self.pinpoints is None:
            raise ValueError("--pinpoints is resolved from the tower's input size: call EncodeConfig.for_tower first")
        try:
            points = tuple(tuple(int(v) for v in item.lower().split("x")) for item in self.pinpoints.split(","))
        except ValueError:
            points = ()
        if not points or any(len(p) != 2 or min(p) < 1 for p in points):
            raise ValueError(f"--pinpoints must look like 336x672,672x336; got {self.pinpoints!r}")
        return points

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
