"""Tests for evals.zeroshot: hand-computed class embeddings, logits and CLIP_benchmark metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from evals.zeroshot import (
    DEFAULT_TEMPLATES,
    ZeroShotClassifier,
    build_class_embeddings,
    classification_metrics,
    expand_prompts,
)

# Prompt -> text embedding for TableModel: lets the class embeddings be worked out by hand.
PROMPT_EMBEDDINGS = {
    "cat-a": [3.0, 4.0, 0.0],  # normalised: [0.6, 0.8, 0]
    "cat-b": [2.0, 0.0, 0.0],  # normalised: [1, 0, 0]
    "dog-a": [0.0, 0.0, 2.0],  # normalised: [0, 0, 1]
    "dog-b": [0.0, 0.0, 7.0],
}
PROMPT_IDS = {prompt: i for i, prompt in enumerate(PROMPT_EMBEDDINGS)}


def table_tokenizer(texts: list[str]) -> Tensor:
    """Map each known prompt to a one-token sequence."""
    return torch.tensor([[PROMPT_IDS[t]] for t in texts])


class TableModel(nn.Module):
    """encode_text looks the prompt up in PROMPT_EMBEDDINGS; encode_image = first 3 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(list(PROMPT_EMBEDDINGS.values())))

    def encode_text(self, text: Tensor) -> Tensor:
        return self.table[text[:, 0]]

    def encode_image(self, image: Tensor) -> Tensor:
        return image.flatten(1)[:, :3]


def reference_class_embeddings(model, tokenizer, classnames, templates) -> Tensor:
    """CLIP_benchmark's zero_shot_classifier loop, one class at a time, transposed to [C, d]."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            if isinstance(templates, dict):
                texts = templates[name]
            else:
                texts = [t.format(c=name) for t in templates]
            embedding = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(dim=0)
            rows.append(embedding / embedding.norm())
    return torch.stack(rows)


def test_expand_prompts_list_and_dict() -> None:
    prompts, owners = expand_prompts(["cat", "dog"], ["{c}-a", "{c}-b"])
    assert prompts == ["cat-a", "cat-b", "dog-a", "dog-b"]
    assert owners.tolist() == [0, 0, 1, 1]
    prompts, owners = expand_prompts(["cat", "dog"], {"dog": ["dog-a"], "cat": ["cat-a", "x"]})
    assert prompts == ["cat-a", "x", "dog-a"]
    assert owners.tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    ("classnames", "templates", "match"),
    [
        (["cat"], ["a photo"], "placeholder"),
        (["cat", "dog"], {"cat": ["cat-a"]}, "dog"),
        (["cat"], "{c}", "not the string"),
        (["cat"], [], "empty"),
        ([], DEFAULT_TEMPLATES, "non-empty"),
        (["cat"], {"cat": []}, "non-empty list of prompts"),
    ],
)
def test_expand_prompts_rejects_bad_input(classnames, templates, match) -> None:
    with pytest.raises(ValueError, match=match):
        expand_prompts(classnames, templates)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
@pytest.mark.parametrize(
    "templates", [["{c}-a", "{c}-b"], {"cat": ["cat-a", "cat-b"], "dog": ["dog-a"]}]
)
def test_class_embeddings_by_hand(templates, batch_size) -> None:
    # cat: mean([0.6, 0.8, 0], [1, 0, 0]) = [0.8, 0.4, 0] -> [2, 1, 0] / sqrt(5); dog: [0, 0, 1]
    weights = build_class_embeddings(
        TableModel(), table_tokenizer, ["cat", "dog"], templates, batch_size=batch_size
    )
    expected = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, math.sqrt(5.0)]]) / math.sqrt(5.0)
    torch.testing.assert_close(weights, expected)


def test_logits_by_hand() -> None:
    clf = ZeroShotClassifier.from_model(
        TableModel(), table_tokenizer, ["cat", "dog"], ["{c}-a", "{c}-b"]
    )
    # image features [1, 2, 0] -> /sqrt(5); . cat = (2 + 2) / 5 = 0.8 -> logit 80; . dog = 0
    images = torch.zeros(1, 3, 2, 2)
    images.view(1, -1)[0, :3] = torch.tensor([1.0, 2.0, 0.0])
    torch.testing.assert_close(clf.logits(images), torch.tensor([[80.0, 0.0]]))
    torch.testing.assert_close(clf.predict_proba(images).sum(1), torch.ones(1))
    assert clf.predict(images).tolist() == [0]


@pytest.mark.parametrize("per_class", [False, True])
def test_from_model_matches_reference_on_open_clip(tiny_clip, tokenizer, per_class) -> None:
    classnames = ["cat", "dog", "car"]
    templates: list[str] | dict[str, list[str]] = ["a photo of a {c}.", "a drawing of a {c}."]
    if per_class:
        templates = {"cat": ["a furry cat."], "dog": ["a dog", "a loyal dog."], "car": ["a car"]}
    tiny_clip.train()
    tiny_clip.visual.eval()  # a frozen tower must stay in eval mode afterwards
    clf = ZeroShotClassifier.from_model(tiny_clip, tokenizer, classnames, templates, batch_size=2)
    assert tiny_clip.training and tiny_clip.transformer.training
    assert not tiny_clip.visual.training
    tiny_clip.eval()
    expected = reference_class_embeddings(tiny_clip, tokenizer, classnames, templates)
    torch.testing.assert_close(clf.class_embeddings, expected)
    torch.testing.assert_close(clf.class_embeddings.norm(dim=1), torch.ones(3))
    assert clf.logits(torch.randn(5, 3, 16, 16)).shape == (5, 3)


@pytest.mark.parametrize("per_class", [False, True])
def test_predicts_class_aligned_images(fake_model, tokenizer, per_class) -> None:
    classnames = ["cat", "dog", "airplane", "tree", "boat"]
    templates = {c: [f"a {c}.", f"the {c} here"] for c in classnames} if per_class else None
    clf = ZeroShotClassifier.from_model(
        fake_model, tokenizer, classnames, templates or ["a photo of a {c}.", "a {c}"]
    )
    generator = torch.Generator().manual_seed(1)
    images = 0.01 * torch.randn(5, 3, 4, 4, generator=generator)
    images.view(5, -1)[:, : fake_model.dim] += clf.class_embeddings  # image i looks like class i
    assert clf.predict(images).tolist() == [0, 1, 2, 3, 4]
    proba = clf.predict_proba(images)
    assert proba.shape == (5, 5)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(5))
    assert clf.logits(images).shape == (5, 5)
    assert all(calls == (False, False) for calls in fake_model.calls)  # eval mode, no grad
    assert fake_model.training


def test_batching_and_empty_input(fake_model, tokenizer) -> None:
    whole = ZeroShotClassifier.from_model(fake_model, tokenizer, ["a", "b", "c"], batch_size=64)
    small = ZeroShotClassifier.from_model(fake_model, tokenizer, ["a", "b", "c"], batch_size=1)
    torch.testing.assert_close(small.class_embeddings, whole.class_embeddings)
    images = torch.randn(7, 3, 4, 4)
    torch.testing.assert_close(small.logits(images), whole.logits(images))
    assert whole.logits(torch.zeros(0, 3, 4, 4)).shape == (0, 3)


def test_pil_images_and_paths_match_tensors(fake_model, tokenizer, tmp_path) -> None:
    def preprocess(image: Image.Image) -> Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0

    clf = ZeroShotClassifier.from_model(
        fake_model, tokenizer, ["x", "y"], preprocess=preprocess, batch_size=2
    )
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(3)]
    paths = []
    for i, image in enumerate(pils):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    expected = clf.logits(torch.stack([preprocess(image) for image in pils]))
    torch.testing.assert_close(clf.logits(pils), expected)
    torch.testing.assert_close(clf.logits(paths), expected)
    torch.testing.assert_close(clf.logits([str(p) for p in paths]), expected)
    clf.preprocess = None
    with pytest.raises(ValueError, match="preprocess is None"):
        clf.logits(pils)


def test_metrics_four_images_three_classes() -> None:
    logits = torch.tensor([[3.0, 1, 2], [1, 3, 2], [3, 2, 1], [1, 2, 3]])
    targets = torch.tensor([0, 1, 2, 2])  # argmax: 0, 1, 0 (wrong), 2
    metrics = classification_metrics(logits, targets)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(type(value) is float for value in metrics.values())
    assert metrics["acc1"] == pytest.approx(0.75)
    assert math.isnan(metrics["acc5"])  # fewer than 5 classes
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_acc5_with_six_classes() -> None:
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]]).repeat(3, 1)
    targets = torch.tensor([0, 4, 5])  # rank 1, rank 5, rank 6
    metrics = classification_metrics(logits, targets)
    assert metrics["acc1"] == pytest.approx(1 / 3)
    assert metrics["acc5"] == pytest.approx(2 / 3)


def test_mean_per_class_recall_imbalanced() -> None:
    # always predicting the majority class: accuracy 0.8 but balanced accuracy (1 + 0) / 2
    logits = torch.tensor([[1.0, 0.0]]).repeat(5, 1)
    metrics = classification_metrics(logits, torch.tensor([0, 0, 0, 0, 1]))
    assert metrics["acc1"] == pytest.approx(0.8)
    assert metrics["mean_per_class_recall"] == pytest.approx(0.5)
    # a class that is only predicted (2) is left out, as sklearn's balanced_accuracy_score does
    logits = F.one_hot(torch.tensor([0, 2, 1, 1]), 3).float()
    metrics = classification_metrics(logits, torch.tensor([0, 0, 1, 1]))
    assert metrics["mean_per_class_recall"] == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("empty_class", [False, True])
def test_multilabel_mean_average_precision(empty_class) -> None:
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
    # class 0 ranked: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2; class 1: pos, pos -> AP = 1
    if empty_class:  # a class without positives counts as AP 0 (CLIP_benchmark's mean)
        scores = torch.cat([scores, torch.rand(4, 1)], dim=1)
        targets = torch.cat([targets, torch.zeros(4, 1, dtype=torch.long)], dim=1)
    metrics = classification_metrics(scores, targets)
    assert set(metrics) == {"mean_average_precision"}
    assert type(metrics["mean_average_precision"]) is float
    expected = (5 / 6 + 1) / 3 if empty_class else (5 / 6 + 1) / 2
    assert metrics["mean_average_precision"] == pytest.approx(expected)


def test_accuracy_matches_clip_benchmark_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=generator)
    targets = torch.randint(0, 10, (50,), generator=generator)
    top5 = logits.topk(5, 1, True, True)[1].t()  # CLIP_benchmark's accuracy()
    correct = top5.eq(targets.view(1, -1).expand_as(top5))
    expected = [correct[:k].reshape(-1).float().sum().item() / 50 for k in (1, 5)]
    metrics = classification_metrics(logits, targets)
    assert [metrics["acc1"], metrics["acc5"]] == pytest.approx(expected)


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="targets must be"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="must match logits"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="lie in"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))


def test_bfloat16_autocast_gives_float32_logits(tiny_clip, tokenizer) -> None:
    clf = ZeroShotClassifier.from_model(
        tiny_clip, tokenizer, ["cat", "dog"], amp_dtype=torch.bfloat16
    )
    logits = clf.logits(torch.randn(3, 3, 16, 16))
    assert logits.dtype == torch.float32 and logits.shape == (3, 2)
    torch.testing.assert_close(clf.class_embeddings.norm(dim=1), torch.ones(2))


def test_model_without_encoders_is_rejected(tokenizer) -> None:
    with pytest.raises(TypeError, match="has no encode_text"):
        ZeroShotClassifier.from_model(nn.Linear(2, 2), tokenizer, ["cat"])
