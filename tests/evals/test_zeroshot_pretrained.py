"""Tests for ZeroShotClassifier.from_pretrained, save/load and the exactness of the metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evals.export import export_run
from evals.zeroshot import (
    EMBEDDINGS_FILE,
    NAMES_FILE,
    ZeroShotClassifier,
    build_class_embeddings,
    classification_metrics,
)

CLASSNAMES = ["cat", "dog", "red car"]


def pil_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["run", "export"])
def test_from_pretrained_matches_from_model(tiny_run, tmp_path, kind) -> None:
    run_dir, model = tiny_run
    reference = run_dir if kind == "run" else export_run(run_dir, tmp_path / "export")
    clf = ZeroShotClassifier.from_pretrained(reference, CLASSNAMES, batch_size=2)
    assert clf.classnames == CLASSNAMES and clf.templates == ("a photo of a {c}.",)
    expected = build_class_embeddings(model, clf.tokenizer, CLASSNAMES, ["a photo of a {c}."])
    torch.testing.assert_close(clf.class_embeddings, expected)
    images = pil_images(3)
    batch = torch.stack([clf.preprocess(image) for image in images])
    assert batch.shape == (3, 3, 32, 32)  # the stored preprocessing: 32 px
    torch.testing.assert_close(clf.logits(images), clf.logits(batch))


def test_per_class_templates(tiny_run) -> None:
    templates = {"cat": ["a cat.", "a kitten."], "dog": ["a dog."], "red car": ["a red car."]}
    clf = ZeroShotClassifier.from_pretrained(tiny_run[0], CLASSNAMES, templates)
    expected = build_class_embeddings(tiny_run[1], clf.tokenizer, CLASSNAMES, templates)
    torch.testing.assert_close(clf.class_embeddings, expected)


def test_save_and_load_round_trip(tiny_run, tmp_path) -> None:
    clf = ZeroShotClassifier.from_pretrained(tiny_run[0], CLASSNAMES, ["{c}", "a {c}."])
    folder = clf.save(tmp_path / "clf")
    assert sorted(p.name for p in folder.iterdir()) == sorted([EMBEDDINGS_FILE, NAMES_FILE])
    assert json.loads((folder / NAMES_FILE).read_text())["classnames"] == CLASSNAMES
    loaded = ZeroShotClassifier.load(folder, clf.model, clf.preprocess, clf.tokenizer)
    assert loaded.classnames == CLASSNAMES and loaded.templates == ["{c}", "a {c}."]
    torch.testing.assert_close(loaded.class_embeddings, clf.class_embeddings, rtol=0, atol=0)
    images = pil_images(2)
    torch.testing.assert_close(loaded.logits(images), clf.logits(images))


def test_save_needs_class_names_and_names_must_match_rows(fake_model) -> None:
    with pytest.raises(ValueError, match="no class names"):
        ZeroShotClassifier(torch.eye(2), fake_model, None, None).save("unused")
    with pytest.raises(ValueError, match="3 class names for 2"):
        ZeroShotClassifier(torch.eye(2), fake_model, None, None, classnames=["a", "b", "c"])


def test_metrics_are_exact_python_divisions() -> None:
    # float32 means would give 0.3333333432674408 and differ from CLIP_benchmark's values
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    metrics = classification_metrics(logits, torch.tensor([0, 1, 0]))
    assert metrics["acc1"] == 1 / 3
    assert metrics["mean_per_class_recall"] == np.mean([1 / 2, 0 / 1])
