"""ClipEncoder: one pass, no layer after the selected one, and outputs equal to an independent computation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import CLIPVisionModel

from operators.encode import ClipEncoder, ModelUnavailableError, load_vision_tower
from conftest import TINY_VISION

NUM_LAYERS = TINY_VISION["num_hidden_layers"]
NUM_PATCHES = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, TINY_VISION["image_size"], TINY_VISION["image_size"], generator=generator)


def hooked_reference(model_dir, pixel_values, layer):
    """The published PruMerge recipe: a full forward with hidden states, q/k captured by hooks on the next block."""
    model = CLIPVisionModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    consumer = layer % (NUM_LAYERS + 1)  # hidden_states[L] is the input of encoder.layers[L]
    block = model.encoder.layers[consumer]
    captured = {}
    block.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o))
    block.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
    q, k = captured["q"], captured["k"]  # [B, 1+N, C]
    full_width = (q @ k.transpose(1, 2) * q.shape[-1] ** -0.5).softmax(dim=-1)[:, 0, 1:]
    head_mean = out.attentions[consumer][:, :, 0, 1:].mean(dim=1)  # the model's own attention probabilities
    return out.hidden_states[layer][:, 1:], k[:, 1:], full_width, head_mean


@pytest.mark.parametrize("layer", [-2, 1, 0])
def test_outputs_equal_hook_based_computation(tiny_clip_dir, layer):
    batch = pixels(3)
    features, keys, full_width, head_mean = hooked_reference(tiny_clip_dir, batch, layer)

    out = ClipEncoder(str(tiny_clip_dir), layer=layer, device="cpu")(batch)
    assert out.features.shape == (3, NUM_PATCHES, TINY_VISION["hidden_size"])
    assert out.keys.shape == out.features.shape and out.cls_attn.shape == (3, NUM_PATCHES)
    torch.testing.assert_close(out.features, features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.keys, keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.cls_attn, full_width, atol=1e-7, rtol=1e-4)

    mean_out = ClipEncoder(str(tiny_clip_dir), layer=layer, device="cpu", cls_attention="head_mean")(batch)
    torch.testing.assert_close(mean_out.cls_attn, head_mean, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(mean_out.features, out.features)


def test_one_pass_and_no_block_after_the_selected_layer(tiny_clip_dir):
    encoder = ClipEncoder(str(tiny_clip_dir), layer=-2, device="cpu")
    selected = NUM_LAYERS - 1  # hidden_states[-2] is the output of blocks[:NUM_LAYERS - 1]
    calls: Counter[str] = Counter()
    for name, module in encoder.model.named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: calls.update([name]))

    encoder(pixels(4))

    assert len(encoder.model.encoder.layers) == selected + 1, "blocks after the scoring block are dropped"
    assert calls["embeddings"] == 1 and calls["pre_layrnorm"] == 1
    for index in range(selected):
        assert calls[f"encoder.layers.{index}"] == 1
    scoring = f"encoder.layers.{selected}"
    assert calls[scoring] == 0, "the scoring block is never run whole"
    assert calls[f"{scoring}.layer_norm1"] == 1
    assert calls[f"{scoring}.self_attn.q_proj"] == 1 and calls[f"{scoring}.self_attn.k_proj"] == 1
    for unused in ("self_attn.v_proj", "self_attn.out_proj", "layer_norm2", "mlp"):
        assert calls[f"{scoring}.{unused}"] == 0
    assert calls["post_layernorm"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tower_is_close_to_fp32(tiny_clip_dir, dtype):
    batch = pixels(2)
    full = ClipEncoder(str(tiny_clip_dir), device="cpu", dtype=torch.float32)(batch)
    half = ClipEncoder(str(tiny_clip_dir), device="cpu", dtype=dtype)(batch)
    assert half.features.dtype == dtype and half.keys.dtype == dtype
    assert half.cls_attn.dtype == torch.float32
    torch.testing.assert_close(half.features.float(), full.features, atol=0.1, rtol=0.05)
    torch.testing.assert_close(half.cls_attn, full.cls_attn, atol=2e-4, rtol=0.05)


def test_frame_encoding_does_not_depend_on_batch(tiny_clip_dir):
    encoder = ClipEncoder(str(tiny_clip_dir), device="cpu")
    batch = pixels(8, seed=1)
    alone, together = encoder(batch[:1]), encoder(batch)
    torch.testing.assert_close(together.features[:1], alone.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.cls_attn[:1], alone.cls_attn, atol=1e-7, rtol=1e-5)


def test_last_layer_is_rejected(tiny_clip_dir):
    with pytest.raises(ValueError, match="block after it"):
        ClipEncoder(str(tiny_clip_dir), layer=-1, device="cpu")


def test_missing_local_directory_names_the_model_flag(tmp_path):
    with pytest.raises(ModelUnavailableError, match="--model PATH"):
        ClipEncoder(str(tmp_path / "no-such-model"), device="cpu")


def test_offline_hub_id_fails_fast_with_clear_message(tmp_path):
    """No weights in the cache and no network: the error tells the user to pass --model PATH."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    code = (
        "from operators.encode import ClipEncoder, ModelUnavailableError\n"
        "try:\n    ClipEncoder('openai/clip-vit-large-patch14-336', device='cpu')\n"
        "except ModelUnavailableError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model PATH" in result.stdout and "openai/clip-vit-large-patch14-336" in result.stdout


def test_loading_a_full_clip_checkpoint_is_quiet_but_missing_vision_weights_raise(tiny_clip_dir, tmp_path, capfd):
    """The text tower left out of a full CLIPModel checkpoint is expected: no load report. A vision weight
    the checkpoint lacks would run as random values, so it is an error."""
    from safetensors.torch import load_file, save_file

    load_vision_tower(str(tiny_clip_dir), torch.float32)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out and "UNEXPECTED" not in captured.err + captured.out

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_clip_dir, damaged)
    weights = load_file(damaged / "model.safetensors")
    dropped = "vision_model.encoder.layers.0.self_attn.k_proj.weight"
    save_file({name: value for name, value in weights.items() if name != dropped}, damaged / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing or of other shapes: encoder\.layers\.0\.self_attn\.k_proj\.weight$"):
        load_vision_tower(str(damaged), torch.float32)
