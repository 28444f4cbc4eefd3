"""Tests for evals.loading: run, checkpoint and open_clip-name references, and clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from evals.loading import ModelLoadError, load_model, newest_checkpoint


def embeddings(model, tokenizer, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of fixed inputs, to compare two models."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(["a cat", "a red dog"]))


def test_run_directory_loads_its_newest_complete_checkpoint(tiny_run, tmp_path) -> None:
    source, model = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    # neither a temporary directory nor one without weights may be picked
    (run_dir / "checkpoints" / ".tmp-step_00000020").mkdir()
    (run_dir / "checkpoints" / "step_00000030").mkdir()
    assert newest_checkpoint(run_dir).name == "step_00000010"
    loaded, preprocess, tokenizer, info = load_model(run_dir)
    assert info.kind == "run" and info.name == "vlp-tiny-vit"
    assert info.pretrained.endswith("step_00000010")
    assert tokenizer(["x"]).shape == (1, 32)  # vlp-tiny-vit's context length
    for ours, theirs in zip(
        embeddings(loaded, tokenizer), embeddings(model, tokenizer), strict=True
    ):
        torch.testing.assert_close(ours, theirs)
    assert not loaded.training
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_checkpoint_directory_and_its_stored_preprocessing(tiny_run, tmp_path) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_run[0] / "checkpoints" / "step_00000005", checkpoint)
    meta = json.loads((checkpoint / "model_config.json").read_text())
    meta["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    (checkpoint / "model_config.json").write_text(json.dumps(meta))
    _, preprocess, _, info = load_model(checkpoint)
    assert info.kind == "checkpoint"
    assert list(info.preprocess_cfg["mean"]) == [0.5, 0.5, 0.5]
    grey = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    torch.testing.assert_close(preprocess(grey), torch.full((3, 32, 32), 2.0))  # (1 - .5) / .25


def test_open_clip_name_with_local_weights(tiny_run) -> None:
    weights = tiny_run[0] / "checkpoints" / "step_00000010" / "model.safetensors"
    model, _, tokenizer, info = load_model("vlp-tiny-vit", str(weights))
    assert info.kind == "open_clip" and info.pretrained == str(weights)
    for ours, theirs in zip(
        embeddings(model, tokenizer), embeddings(tiny_run[1], tokenizer), strict=True
    ):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p, "is not a model: expected a vlp run directory"),
        (lambda p: p / "missing" / "dir", "no such directory"),
        (lambda p: (p / "weights.pt").write_bytes(b"x") and p / "weights.pt", "is a file"),
        (lambda p: (p / "checkpoints").mkdir() or p, "no complete checkpoint"),
        (lambda p: "no-such-model-name", "unknown model"),
    ],
)
def test_a_reference_that_is_not_a_model_is_named(tmp_path, make, match) -> None:
    reference = make(tmp_path)
    with pytest.raises(ModelLoadError, match=match) as error:
        load_model(reference)
    assert str(reference) in str(error.value)


@pytest.mark.parametrize("damage", ["truncate", "other architecture"])
def test_broken_weights_name_the_checkpoint(tiny_run, tmp_path, damage) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_run[0] / "checkpoints" / "step_00000005", checkpoint)
    if damage == "truncate":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        meta = json.loads((checkpoint / "model_config.json").read_text())
        meta["model_cfg"]["embed_dim"] = 64
        (checkpoint / "model_config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=f"'{checkpoint}': open_clip cannot build the model"):
        load_model(checkpoint)


def test_pretrained_with_a_directory_is_an_error(tiny_run) -> None:
    with pytest.raises(ModelLoadError, match="drop pretrained"):
        load_model(tiny_run[0], "laion2b_s34b_b79k")
