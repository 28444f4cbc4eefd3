"""Tests for evals.export: open_clip loads `vlp export` output and computes our embeddings."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from evals.export import WEIGHTS_NAME, export_run
from evals.loading import CONFIG_NAME, load_model
from evals.model_card import CARD_NAME, model_card
from evals.results import write_result
from tests.evals.test_loading import embeddings


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
    return export_run(tiny_run[0], tmp_path_factory.mktemp("exports") / "tiny")


def test_layout(export_dir, tiny_run) -> None:
    assert sorted(p.name for p in export_dir.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
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
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        export_run(tiny_run[0], tmp_path)
    assert export_run(tiny_run[0], tmp_path, overwrite=True) == tmp_path
    assert not (tmp_path / "keep.txt").exists()
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # no staging left behind


@pytest.fixture
def run_with_results(tiny_run, tmp_path):
    """A copy of the tiny run with a config.yaml, a full trainer_state.json and eval results."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    (run_dir / "config.yaml").write_text(
        "model:\n  name: vlp-tiny-vit\nobjective:\n  name: siglip\n  kwargs: {}\n"
        "data:\n  train_shards: data/train/{000000..000003}.tar\n  batch_size: 32\n"
        "optim:\n  lr: 0.0005\n  warmup_steps: 2\ntrain:\n  steps: 10\n"
    )
    state = {"step": 10, "world_size": 2, "global_batch": 64, "samples_seen": 640}
    (run_dir / "checkpoints" / "step_00000010" / "trainer_state.json").write_text(json.dumps(state))
    for dataset, task, metrics in [
        ("heldout", "zeroshot_classification", {"acc1": 0.8125, "acc5": float("nan")}),
        ("coco", "zeroshot_retrieval", {"image_retrieval_recall@1": 0.3375}),
    ]:
        write_result(run_dir / "results" / f"{dataset}_{task}.json", dataset=dataset,
                     model="vlp-tiny-vit", pretrained="step_10", task=task, metrics=metrics)  # fmt: skip
    (run_dir / "results" / "demo.json").write_text(json.dumps({"acc1": 0.5}))  # not CB-shaped
    return run_dir


def test_model_card_names_config_steps_results_and_loading(run_with_results, tmp_path) -> None:
    out = export_run(run_with_results, tmp_path / "export")
    card = (out / CARD_NAME).read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n")
    assert "# vlp-tiny-vit, step 10" in card
    for row in ["| steps trained | 10 |", "| samples seen | 640 |", "| global batch | 64 |",
                "| objective | siglip |", "| model | vlp-tiny-vit |", "| learning rate | 0.0005 |",
                "| batch size per process | 32 |", "| optimizer steps (config) | 10 |",
                "| train shards | `data/train/{000000..000003}.tar` |"]:  # fmt: skip
        assert row in card
    assert "| heldout | zeroshot_classification | step_10 | acc1 0.8125, acc5 nan |" in card
    assert "| coco | zeroshot_retrieval | step_10 | image_retrieval_recall@1 0.3375 |" in card
    assert "demo" not in card.split("## Eval results")[1].split("## How to load")[0]
    assert f'open_clip.create_model_and_transforms("local-dir:{out}")' in card
    assert f'open_clip.create_model_from_pretrained("local-dir:{out}")' in card
    assert "python -m evals.clip_benchmark_cli eval --model_type open_clip" in card
    assert f"--model local-dir:{out} --pretrained none" in card and "--no_amp" in card
    assert "`vlp export RUN OUT --format transformers`" in card  # the other way to load it
    assert "```yaml\nmodel:\n  name: vlp-tiny-vit" in card  # the resolved config itself
    assert "heads.safetensors" not in card  # a CLIP run has no heads


def test_model_card_of_an_objective_with_heads_says_open_clip_loads_the_bare_towers(
    tiny_run,
) -> None:
    info = load_model(tiny_run[0]).info
    card = model_card(info, "exported", {"tokenizer": "open_clip"}, heads=True)
    assert "open_clip loads the bare towers" in card
    assert "`vlp eval` and `evals.loading.load_model` apply the heads" in card


def test_model_card_without_config_or_results(export_dir) -> None:
    card = (export_dir / CARD_NAME).read_text()
    assert "| steps trained | 10 |" in card and "samples seen" not in card
    assert "No eval results were found" in card


def test_export_has_normal_permissions(tiny_run, tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        out = export_run(tiny_run[0], tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_export_permissions_follow_the_umask(tiny_run, tmp_path) -> None:
    previous = os.umask(0o077)
    try:
        out = export_run(tiny_run[0], tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
