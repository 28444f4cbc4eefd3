"""A new user's whole path through the `vlp` command, no Python glue: a class folder -> `vlp
shards write` -> `vlp train` -> `vlp eval zeroshot` on held-out shards -> `vlp export` -> open_clip
loads the export with `local-dir:`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from evals.results import read_result
from launch.cli import main
from tests.evals.conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_class_folder_to_open_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    classes = write_image_folder(tmp_path / "photos", per_class=8, classes=3, seed=0)
    write_image_folder(tmp_path / "heldout_photos", per_class=4, classes=3, seed=1)
    assert main(["shards", "write", str(tmp_path / "photos"), str(tmp_path / "train"),
                 "--samples-per-shard", "8"]) == 0  # fmt: skip
    assert (
        main(["shards", "write", str(tmp_path / "heldout_photos"), str(tmp_path / "heldout")]) == 0
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "launch/configs/demo.yaml"),
                 f"data.train_shards={tmp_path / 'train'}", "data.batch_size=8", "data.workers=0",
                 "data.shuffle_buffer=8", "train.steps=2", "train.log_every=1",
                 "optim.warmup_steps=1", f"train.out_dir={run}"]) == 0  # fmt: skip
    assert main(["eval", "zeroshot", "--model", str(run), "--dataset", str(tmp_path / "heldout"),
                 "--out", str(run / "results"), "--workers", "0"]) == 0  # fmt: skip
    [result_path] = (run / "results").glob("*zeroshot*.json")
    result = read_result(result_path)
    assert result["task"] == "zeroshot_classification" and result["images_evaluated"] == 12
    assert 0 <= result["metrics"]["acc1"] <= 1  # 2 steps: the path is under test, not learning
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 24 samples" in printed and json.dumps(classes) in printed

    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")
    image_path = next((tmp_path / "heldout_photos" / classes[0]).glob("*.png"))
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(image_path)).unsqueeze(0))
        text = model.encode_text(tokenizer([f"a photo of a {c}." for c in classes]))
    assert image.shape == (1, text.shape[1]) and torch.isfinite(image).all()
    card = (tmp_path / "export" / "README.md").read_text()  # the model card
    assert "local-dir:" in card and "acc1" in card and "heldout" in card
