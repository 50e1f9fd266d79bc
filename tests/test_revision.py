"""The model is pinned: `resolve_revision` names the exact checkpoint a run loads, and every load honours it.

A hand-made hub cache (``models--org--name/refs/main``, ``snapshots/<commit>/``) with two snapshots whose
weights differ, read by the real `from_pretrained` in offline mode, stands for a node's Hugging Face cache.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from operators.checkpoint import ModelUnavailableError, resolve_revision
from operators.encode import VisionEncoder
from operators.towers import describe_tower

COMMIT_A, COMMIT_B, ABSENT = "a" * 40, "b" * 40, "c" * 40
REPO = "org/name"
WEIGHT = "vision_model.embeddings.patch_embedding.weight"


def patch_weight(checkpoint: Path) -> torch.Tensor:
    return load_file(checkpoint / "model.safetensors")[WEIGHT]


def change_weight(checkpoint: Path) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    weights[WEIGHT] = weights[WEIGHT] + 1
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def hub_cache(tiny_clip_dir, tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding ``org/name`` at commits A and B (other weights); refs/main names B.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment once, at import, into
    `huggingface_hub.constants`, which it and transformers consult on every call: those are patched.
    """
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / "models--org--name"
    for commit in (COMMIT_A, COMMIT_B):
        shutil.copytree(tiny_clip_dir, repo / "snapshots" / commit)
    change_weight(repo / "snapshots" / COMMIT_B)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_B)
    return repo


def test_hub_id_resolves_to_the_commit_its_ref_names(hub_cache):
    assert resolve_revision(REPO) == COMMIT_B
    assert resolve_revision(REPO, "main") == COMMIT_B
    assert resolve_revision(REPO, COMMIT_A) == COMMIT_A
    (hub_cache / "refs" / "v1").write_text(COMMIT_A)
    assert resolve_revision(REPO, "v1") == COMMIT_A
    (hub_cache / "refs" / "main").write_text(COMMIT_A)
    assert resolve_revision(REPO) == COMMIT_A


def test_encoder_pinned_to_a_commit_loads_that_snapshot(hub_cache):
    weight_a, weight_b = (patch_weight(hub_cache / "snapshots" / commit) for commit in (COMMIT_A, COMMIT_B))
    assert not torch.equal(weight_a, weight_b)

    pinned = VisionEncoder(REPO, device="cpu", revision=COMMIT_A)
    torch.testing.assert_close(pinned.model.embeddings.patch_embedding.weight, weight_a, rtol=0, atol=0)
    unpinned = VisionEncoder(REPO, device="cpu")  # today's behaviour: whatever refs/main names
    torch.testing.assert_close(unpinned.model.embeddings.patch_embedding.weight, weight_b, rtol=0, atol=0)
    assert describe_tower(REPO, COMMIT_A).image_size == 336


def test_a_commit_absent_from_the_cache_is_not_replaced_by_another_snapshot(hub_cache):
    for load in (lambda: resolve_revision(REPO, ABSENT), lambda: describe_tower(REPO, ABSENT),
                 lambda: VisionEncoder(REPO, device="cpu", revision=ABSENT)):
        with pytest.raises(ModelUnavailableError, match=f"revision {ABSENT} .*--model PATH.*--model-revision"):
            load()
    with pytest.raises(ModelUnavailableError, match="--model-revision"):
        resolve_revision(REPO, "no-such-tag")
    (hub_cache / ".no_exist" / ABSENT).mkdir(parents=True)  # what the hub cache records for a missing file
    (hub_cache / ".no_exist" / ABSENT / "config.json").touch()
    with pytest.raises(ModelUnavailableError, match="no config.json at that revision"):
        resolve_revision(REPO, ABSENT)
    with pytest.raises(ModelUnavailableError, match="--model PATH"):
        resolve_revision("org/not-cached")


def test_local_folder_fingerprint_follows_the_files_that_define_the_tower(tiny_clip_dir, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    fingerprint = resolve_revision(str(folder))
    assert re.fullmatch("sha256:[0-9a-f]{64}", fingerprint)
    assert resolve_revision(str(tiny_clip_dir)) == fingerprint, "content, not location"
    assert resolve_revision(str(folder), fingerprint) == fingerprint
    (folder / "README.md").write_text("not part of the tower")
    (folder / "training_args.bin").write_bytes(b"a trainer's file, not loaded by from_pretrained")
    assert resolve_revision(str(folder)) == fingerprint

    encoder = VisionEncoder(str(folder), device="cpu", revision=fingerprint)
    assert encoder.revision == fingerprint

    change_weight(folder)
    changed = resolve_revision(str(folder))
    assert changed != fingerprint
    with pytest.raises(ValueError, match=rf"checkpoint at .*clip.* on this node differs from the one this run "
                                         rf"recorded \({fingerprint}.*{changed}"):
        VisionEncoder(str(folder), device="cpu", revision=fingerprint)
    with pytest.raises(ValueError, match="differs from the one this run recorded"):
        resolve_revision(str(folder), fingerprint)
    with pytest.raises(ValueError, match="differs from the one this run recorded"):
        describe_tower(str(folder), fingerprint)


def test_a_folder_fingerprint_on_a_node_without_the_folder(tmp_path):
    with pytest.raises(ModelUnavailableError, match="not a directory on this node"):
        VisionEncoder(str(tmp_path / "absent"), device="cpu", revision="sha256:" + "0" * 64)


def test_a_hub_checkpoint_whose_processor_file_is_not_cached_is_not_given_defaults(hub_cache, caplog):
    """`from_pretrained` caches the config and weights only. Offline, a processor file neither cached nor known
    to be absent is an error naming the file (defaults could normalise otherwise); once the cache records that
    the repository has none, the family's defaults apply, with a warning."""
    (hub_cache / "snapshots" / COMMIT_A / "preprocessor_config.json").unlink()
    with pytest.raises(ModelUnavailableError, match="preprocessor_config.json.*hf download org/name"):
        describe_tower(REPO, COMMIT_A)
    (hub_cache / ".no_exist" / COMMIT_A).mkdir(parents=True)
    (hub_cache / ".no_exist" / COMMIT_A / "preprocessor_config.json").touch()
    assert describe_tower(REPO, COMMIT_A).image_size == 336
    assert "has no preprocessor_config.json" in caplog.text
    assert describe_tower(REPO, COMMIT_B).preprocessing.resize_size == 336  # cached: read from the cache
