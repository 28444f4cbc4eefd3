"""Tests for evals.export: open_clip loads `vlp export` output and computes our embeddings."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from evals.export import WEIGHTS_NAME, export_run
from evals.loading import CONFIG_NAME, load_model
from tests.evals.test_loading import embeddings


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
    return export_run(tiny_run[0], tmp_path_factory.mktemp("exports") / "tiny")


def test_layout(export_dir, tiny_run) -> None:
    assert sorted(p.name for p in export_dir.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((export_dir / CONFIG_NAME).read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert config["preprocess_cfg"]["size"] in (32, [32, 32])
    assert config["vlp"]["model_name"] == "vlp-tiny-vit"
    assert config["vlp"]["exported_from"].endswith("step_00000010")
    assert config["vlp"]["tokenizer"] == "SimpleTokenizer"


@pytest.mark.parametrize("loader", ["create_model_and_transforms", "create_model_from_pretrained"])
def test_open_clip_loads_the_export_with_our_embeddings(export_dir, tiny_run, loader) -> None:
    created = getattr(open_clip, loader)(f"local-dir:{export_dir}")
    model, preprocess = created[0].eval(), created[-1]
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    _, our_preprocess, our_tokenizer, _ = load_model(tiny_run[0])
    assert torch.equal(tokenizer(["a red dog"]), our_tokenizer(["a red dog"]))
    for theirs, ours in zip(
        embeddings(model, tokenizer), embeddings(tiny_run[1], our_tokenizer), strict=True
    ):
        torch.testing.assert_close(theirs, ours)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(image), our_preprocess(image))


def test_vlp_loads_the_export(export_dir, tiny_run) -> None:
    model, _, tokenizer, info = load_model(export_dir)
    assert info.kind == "export" and info.name == f"local-dir:{export_dir}"
    for theirs, ours in zip(
        embeddings(model, tokenizer), embeddings(tiny_run[1], tokenizer), strict=True
    ):
        torch.testing.assert_close(theirs, ours)


def test_refuses_a_non_empty_folder(tiny_run, tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_run(tiny_run[0], tmp_path)
    assert export_run(tiny_run[0], tmp_path, overwrite=True) == tmp_path
    assert not (tmp_path / "keep.txt").exists()
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # no staging left behind
