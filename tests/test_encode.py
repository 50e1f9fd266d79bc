"""VisionEncoder on every tower family: one pass, no block after the selected one, and features, keys and every
importance rule equal to an independent computation (the model's own forward with hooks, its own attention
probabilities, its own pooling head)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import (CLIPVisionModel, Dinov2Model, Siglip2ImageProcessorPil, Siglip2VisionModel,
                          SiglipVisionModel, ViTModel)

from operators.checkpoint import ModelUnavailableError
from operators.encode import VisionEncoder
from operators.prumerge import prumerge
from operators.towers import describe_tower, load_tower, tower_family
from conftest import FAMILIES
from reference_prumerge import reference_prumerge

MODEL_CLASS = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "siglip2": Siglip2VisionModel,
               "vit": ViTModel, "dinov2": Dinov2Model}
# Written out here rather than taken from operators.towers, so the reference does not share its lookups.
BLOCKS = {"clip": "encoder.layers", "siglip": "encoder.layers", "siglip2": "encoder.layers", "vit": "layers",
          "dinov2": "encoder.layer"}
ATTENTION = {"clip": "self_attn", "siglip": "self_attn", "siglip2": "self_attn", "vit": "attention",
             "dinov2": "attention"}
CLS = {"clip": True, "siglip": False, "siglip2": False, "vit": True, "dinov2": True}
RULES = [(family, rule) for family in FAMILIES for rule in ("cls", "cls_head_mean", "probe", "mean_received")
         if (rule.startswith("cls") and CLS[family]) or (rule == "probe" and not CLS[family]) or rule == "mean_received"]


def images(family_dir, batch: int, seed: int = 0) -> torch.Tensor:
    """``[B, S, S, 3]`` uint8 random views at the tower's input size."""
    size = describe_tower(str(family_dir)).image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), generator=generator, dtype=torch.uint8)


def model_input(family_dir, views: torch.Tensor) -> torch.Tensor:
    return describe_tower(str(family_dir)).preprocessing.normalize(views)


def reference(family: str, family_dir, views: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Features, keys and every importance rule from the whole model's own forward (eager attention)."""
    model = MODEL_CLASS[family].from_pretrained(family_dir, attn_implementation="eager").eval()
    blocks = model.get_submodule(BLOCKS[family])
    consumer = layer % (len(blocks) + 1)  # hidden_states[L] is the input of blocks[L]
    attention = getattr(blocks[consumer], ATTENTION[family])
    captured = {}
    attention.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o))
    attention.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    with torch.no_grad():
        if family == "siglip2":  # through its own image processor: its patch order, its NaFlex inputs
            grid = int(model.config.num_patches**0.5)
            processor = Siglip2ImageProcessorPil(max_num_patches=grid * grid, patch_size=model.config.patch_size)
            inputs = processor([view.numpy() for view in views], return_tensors="pt")
            assert inputs["spatial_shapes"].tolist() == [[grid, grid]] * len(views)
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
        else:
            out = model(model_input(family_dir, views), output_hidden_states=True, output_attentions=True)
        prefix = 1 if CLS[family] else 0
        q, k = captured["q"], captured["k"]  # [B, P+N, C]
        probs = out.attentions[consumer]  # [B, heads, P+N, P+N], the model's own attention probabilities
        result = {
            "features": out.hidden_states[layer][:, prefix:],
            "keys": k[:, prefix:],
            "mean_received": probs.mean(dim=(1, 2))[:, prefix:],
        }
        if CLS[family]:
            result["cls"] = (q @ k.transpose(1, 2) * q.shape[-1] ** -0.5).softmax(dim=-1)[:, 0, 1:]
            result["cls_head_mean"] = probs[:, :, 0, 1:].mean(dim=1)
        else:  # the pooling head itself, on the selected states after the final norm
            normed = model.post_layernorm(out.hidden_states[layer])
            probe = model.head.probe.expand(len(views), 1, -1)
            result["probe"] = model.head.attention(probe, normed, normed, need_weights=True)[1][:, 0]
    return result


@pytest.mark.parametrize("family,rule", RULES)
@pytest.mark.parametrize("layer", [-2, 1])
def test_outputs_equal_the_models_own_computation(tower_dirs, family, rule, layer):
    views = images(tower_dirs[family], 3)
    expected = reference(family, tower_dirs[family], views, layer)

    out = VisionEncoder(str(tower_dirs[family]), layer=layer, device="cpu", importance=rule)(
        model_input(tower_dirs[family], views))
    tower = describe_tower(str(tower_dirs[family]))
    assert out.features.shape == (3, tower.grid_size**2, tower.hidden_size)
    assert out.keys.shape == out.features.shape and out.importance.shape == (3, tower.grid_size**2)
    assert out.importance.dtype == torch.float32
    torch.testing.assert_close(out.features, expected["features"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.keys, expected["keys"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.importance, expected[rule], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("family,rule", RULES)
@pytest.mark.parametrize("mode,budget", [("prumerge", None), ("prumerge+", None), ("fixed", 7)])
def test_every_reduction_mode_on_every_importance_rule(tower_dirs, family, rule, mode, budget):
    """PruMerge, PruMerge+ and the fixed budget take any rule's scores: equal to the plain-loop reference."""
    out = VisionEncoder(str(tower_dirs[family]), device="cpu", importance=rule)(
        model_input(tower_dirs[family], images(tower_dirs[family], 2, seed=3)))
    reduced = prumerge(out.features, out.keys, out.importance, mode=mode, budget=budget, k_neighbors=8)
    expected = reference_prumerge(out.features, out.keys, out.importance, mode, budget, 8)
    for i, (tokens, positions, scores) in enumerate(expected):
        assert reduced.positions[i].tolist() == positions
        torch.testing.assert_close(reduced.tokens[i].double(), tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reduced.scores[i].double(), torch.tensor(scores, dtype=torch.float64),
                                   atol=1e-7, rtol=1e-5)
        if budget:
            assert len(positions) == budget + 1


@pytest.mark.parametrize("family,rule", RULES)
def test_one_pass_and_no_block_after_the_selected_layer(tower_dirs, family, rule):
    encoder = VisionEncoder(str(tower_dirs[family]), layer=-2, device="cpu", importance=rule)
    blocks_path, attention = BLOCKS[family], ATTENTION[family]
    selected = encoder.model.config.num_hidden_layers - 1  # hidden_states[-2] is the output of all blocks but one
    calls: Counter[str] = Counter()
    for name, module in encoder.model.named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: calls.update([name]))

    encoder(model_input(tower_dirs[family], images(tower_dirs[family], 4)))

    assert len(encoder.model.get_submodule(blocks_path)) == selected + 1, "blocks after the scoring block are dropped"
    assert calls["embeddings"] == 1
    for index in range(selected):
        assert calls[f"{blocks_path}.{index}"] == 1
    scoring = f"{blocks_path}.{selected}"
    assert calls[scoring] == 0, "the scoring block is never run whole"
    assert calls[f"{scoring}.{attention}.k_proj"] == 1
    assert calls[f"{scoring}.{attention}.q_proj"] == (0 if rule == "probe" else 1)
    for unused in (f"{attention}.v_proj", f"{attention}.out_proj", f"{attention}.o_proj", "mlp"):
        assert calls[f"{scoring}.{unused}"] == 0
    assert calls["post_layernorm"] == (1 if rule == "probe" else 0)
    assert calls["head"] == 0 and calls["head.mlp"] == 0, "the pooling head's own forward never runs"
    kept = {name.split(".")[0] for name, _ in encoder.model.named_parameters()}
    assert kept <= {"embeddings", "encoder", "layers", "pre_layrnorm", *(("post_layernorm", "head") if rule == "probe" else ())}


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_encoding_does_not_depend_on_batch(tower_dirs, family):
    encoder = VisionEncoder(str(tower_dirs[family]), device="cpu", importance="mean_received")
    batch = model_input(tower_dirs[family], images(tower_dirs[family], 6, seed=1))
    alone, together = encoder(batch[:1]), encoder(batch)
    torch.testing.assert_close(together.features[:1], alone.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.importance[:1], alone.importance, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tower_is_close_to_fp32(tower_dirs, dtype):
    batch = model_input(tower_dirs["siglip"], images(tower_dirs["siglip"], 2))
    full = VisionEncoder(str(tower_dirs["siglip"]), device="cpu", dtype=torch.float32)(batch)
    half = VisionEncoder(str(tower_dirs["siglip"]), device="cpu", dtype=dtype)(batch)
    assert half.features.dtype == dtype and half.keys.dtype == dtype
    assert half.importance.dtype == torch.float32
    torch.testing.assert_close(half.features.float(), full.features, atol=0.1, rtol=0.05)
    torch.testing.assert_close(half.importance, full.importance, atol=2e-4, rtol=0.05)


@pytest.mark.parametrize("family,default", [("clip", "cls"), ("vit", "cls"), ("dinov2", "cls"), ("siglip", "probe"),
                                            ("siglip2", "probe")])
def test_default_importance_follows_the_tower(tower_dirs, family, default):
    assert VisionEncoder(str(tower_dirs[family]), device="cpu").importance == default
    assert describe_tower(str(tower_dirs[family])).default_importance == default


@pytest.mark.parametrize("family,rule,why", [("siglip", "cls", "no CLS token"), ("siglip2", "cls_head_mean", "no CLS"),
                                             ("clip", "probe", "no attention-pooling head"),
                                             ("dinov2", "probe", "no attention-pooling head")])
def test_a_rule_the_tower_cannot_compute_is_refused(tower_dirs, family, rule, why):
    with pytest.raises(ValueError, match=f"--importance {rule}.*{why}"):
        VisionEncoder(str(tower_dirs[family]), device="cpu", importance=rule)


def test_a_siglip_checkpoint_without_its_head_defaults_to_mean_received(tmp_path):
    from transformers import SiglipVisionConfig

    SiglipVisionModel(SiglipVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, vision_use_head=False)
                      ).save_pretrained(tmp_path)
    encoder = VisionEncoder(str(tmp_path), device="cpu")
    assert encoder.importance == "mean_received"
    with pytest.raises(ValueError, match="--importance probe"):
        VisionEncoder(str(tmp_path), device="cpu", importance="probe")


def test_last_layer_is_rejected(tiny_clip_dir):
    with pytest.raises(ValueError, match="block after it"):
        VisionEncoder(str(tiny_clip_dir), layer=-1, device="cpu")


def test_an_unsupported_model_type_names_the_supported_ones(tmp_path):
    from transformers import ConvNextConfig, ConvNextModel

    ConvNextModel(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'convnext' checkpoint; --model takes .*siglip_vision_model.*dinov2"):
        VisionEncoder(str(tmp_path), device="cpu")


def test_missing_local_directory_names_the_model_flag(tmp_path):
    with pytest.raises(ModelUnavailableError, match="--model PATH"):
        VisionEncoder(str(tmp_path / "no-such-model"), device="cpu")


def test_offline_hub_id_fails_fast_with_clear_message(tmp_path):
    """No weights in the cache and no network: the error tells the user to pass --model PATH."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    code = (
        "from operators.encode import VisionEncoder\nfrom operators.checkpoint import ModelUnavailableError\n"
        "try:\n    VisionEncoder('google/siglip-so400m-patch14-384', device='cpu')\n"
        "except ModelUnavailableError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model PATH" in result.stdout and "google/siglip-so400m-patch14-384" in result.stdout


@pytest.mark.parametrize("family,dropped", [
    ("clip", "vision_model.encoder.layers.0.self_attn.k_proj.weight"),
    ("siglip", "vision_model.encoder.layers.1.layer_norm1.weight"),
    ("vit", "vit.embeddings.cls_token"),
])
def test_loading_a_whole_checkpoint_is_quiet_but_missing_weights_the_encoder_runs_raise(
        tower_dirs, tmp_path, capfd, family, dropped):
    """The text tower of a whole CLIP/SigLIP checkpoint, a classifier's head, the pooler and the blocks after the
    scoring block are left out on purpose: no load report. A weight the encoder runs that the checkpoint lacks
    would run as random values, so it is an error."""
    from safetensors.torch import load_file, save_file

    load_tower(str(tower_dirs[family]), tower_family(str(tower_dirs[family])), torch.float32, None, 2, probe=False)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out and "UNEXPECTED" not in captured.err + captured.out
    assert "Loading weights" not in captured.err + captured.out

    damaged = tmp_path / "damaged"
    shutil.copytree(tower_dirs[family], damaged)
    weights = load_file(damaged / "model.safetensors")
    assert dropped in weights
    save_file({name: value for name, value in weights.items() if name != dropped}, damaged / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing or of other shapes: .*" + dropped.split(".", 1)[1].replace(".", r"\.")):
        load_tower(str(damaged), tower_family(str(damaged)), torch.float32, None, 2, probe=False)


def test_weights_of_modules_the_encoder_never_runs_may_be_absent(tower_dirs, tmp_path):
    """A SigLIP checkpoint without its last block and head (LLaVA-OneVision's tower drops both) still encodes
    at layer -2 with a rule that does not need the head; the probe rule needs it."""
    from safetensors.torch import load_file, save_file

    trimmed = tmp_path / "trimmed"
    shutil.copytree(tower_dirs["siglip"], trimmed)
    weights = load_file(trimmed / "model.safetensors")
    kept = {name: value for name, value in weights.items()
            if ".head." not in name and "encoder.layers.2." not in name and "post_layernorm" not in name}
    assert len(kept) < len(weights)
    save_file(kept, trimmed / "model.safetensors", metadata={"format": "pt"})
    views = model_input(trimmed, images(trimmed, 2))
    whole = VisionEncoder(str(tower_dirs["siglip"]), layer=1, device="cpu", importance="mean_received")(views)
    out = VisionEncoder(str(trimmed), layer=1, device="cpu")(views)  # its config still says it has the head
    assert out.importance is not None and describe_tower(str(trimmed)).default_importance == "mean_received"
    torch.testing.assert_close(out.importance, whole.importance)
    with pytest.raises(ValueError, match="--importance probe.*no attention-pooling head"):
        VisionEncoder(str(trimmed), layer=1, device="cpu", importance="probe")


def test_importance_rules_are_distributions_over_the_patches(tower_dirs):
    """Without a CLS token every rule sums to 1 over the patches; with one, to the patches' share (< 1)."""
    for family, rule in RULES:
        out = VisionEncoder(str(tower_dirs[family]), device="cpu", importance=rule)(
            model_input(tower_dirs[family], images(tower_dirs[family], 2)))
        sums = out.importance.sum(dim=1).numpy()
        assert (out.importance >= 0).all()
        if CLS[family]:
            assert np.all((sums > 0.5) & (sums < 1.0)), (family, rule, sums)
        else:
            np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
