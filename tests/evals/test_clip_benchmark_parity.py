"""Our metric functions against CLIP_benchmark's own, on the same features: identical values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("clip_benchmark")

from evals.clip_benchmark_cli import numpy_scalar_fix  # noqa: E402
from evals.retrieval import retrieval_metrics  # noqa: E402
from evals.zeroshot import ZeroShotClassifier, classification_metrics  # noqa: E402
from tests.evals import clip_benchmark_reference as clip_benchmark_ref  # noqa: E402


def features(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def prompts_of(classnames, templates) -> list[str]:
    if isinstance(templates, dict):
        return [p for c in classnames for p in templates[c]]
    return [t.format(c=c) for c in classnames for t in templates]


@pytest.mark.parametrize("num_classes", [3, 7])
@pytest.mark.parametrize("cupl", [False, True])
def test_zeroshot_classification_is_clip_benchmarks(num_classes, cupl) -> None:
    classnames = [f"class {i}" for i in range(num_classes)]
    templates = ["a photo of a {c}.", "a {c}"]
    if cupl:
        templates = {
            c: [f"{c} here", f"see {c}", f"{c}!"][: 1 + i % 3] for i, c in enumerate(classnames)
        }
    prompts = prompts_of(classnames, templates)
    text = features(len(prompts), 12, seed=1)
    prompt_features = dict(zip(prompts, text, strict=True))
    images = features(50, 12, seed=2) + 0.3 * text[torch.arange(50) % len(prompts)]
    targets = torch.randint(0, num_classes, (50,), generator=torch.Generator().manual_seed(3))

    theirs = clip_benchmark_ref.zeroshot_classification(
        images, targets, prompt_features, classnames, templates
    )
    model = clip_benchmark_ref.FeatureModel(text)
    clf = ZeroShotClassifier.from_model(
        model, clip_benchmark_ref.TableTokenizer(prompts), classnames, templates, batch_size=4
    )
    ours = classification_metrics(clf.logits_from_features(F.normalize(images, dim=-1)), targets)
    assert set(ours) == set(theirs)
    assert ours["acc1"] == theirs["acc1"]
    assert ours["mean_per_class_recall"] == theirs["mean_per_class_recall"]
    if num_classes < 5:
        assert math.isnan(ours["acc5"]) and math.isnan(theirs["acc5"])
    else:
        assert ours["acc5"] == theirs["acc5"]


@pytest.mark.parametrize("empty_class", [False, True])
def test_multilabel_mean_average_precision_is_clip_benchmarks(empty_class) -> None:
    classnames = [f"c{i}" for i in range(6)]
    text = features(6, 8, seed=4)
    images = features(40, 8, seed=5)
    targets = (torch.rand(40, 6, generator=torch.Generator().manual_seed(6)) < 0.3).long()
    targets[0] = 1
    if empty_class:  # a class without positives: AP 0 in both
        targets[:, 5] = 0
    theirs = clip_benchmark_ref.zeroshot_classification(
        images, targets, dict(zip(classnames, text, strict=True)), classnames, ["{c}"]
    )
    logits = 100.0 * F.normalize(images, dim=-1) @ text.T
    assert classification_metrics(logits, targets) == theirs


@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_recall_is_clip_benchmarks(ties) -> None:
    generator = torch.Generator().manual_seed(7)
    counts = torch.randint(1, 5, (150,), generator=generator)
    index = torch.repeat_interleave(torch.arange(150), counts)
    if ties:  # unit axis vectors: scores are exactly 0 or 1, ties are decided by torch.topk
        axes = torch.randint(0, 6, (150,), generator=generator)
        noise = torch.randint(0, 6, (len(index),), generator=generator)
        keep = torch.rand(len(index), generator=generator) < 0.5
        images = F.one_hot(axes, 6).float()
        texts = F.one_hot(torch.where(keep, axes[index], noise), 6).float()
    else:
        images = features(150, 6, seed=8)
        texts = F.normalize(images[index] + 0.5 * features(len(index), 6, seed=9), dim=-1)
    ks = (1, 5, 10, 50)
    theirs = clip_benchmark_ref.zeroshot_retrieval(images, texts, index.tolist(), ks)
    ours = retrieval_metrics(images, texts, index, ks, chunk_size=37)
    assert {key: ours[key] for key in theirs} == theirs


def test_clip_benchmark_accuracy_still_needs_the_numpy_fix() -> None:
    # clip-benchmark 1.6.2 calls float() on a 1-element array, which NumPy >= 2.4 refuses; if
    # this starts passing without the fix, numpy_scalar_fix can go.
    from clip_benchmark.metrics.zeroshot_classification import accuracy

    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match="0-dimensional"):
        accuracy(logits, targets)
    with numpy_scalar_fix():
        assert accuracy(logits, targets)[0] == classification_metrics(logits, targets)["acc1"]
