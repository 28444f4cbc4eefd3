"""Tests for evals.linear_probe: separable features, determinism, the sweep, sklearn parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evals.linear_probe import fit_logistic_regression, linear_probe, validation_split


def clusters(per_class: int, num_classes: int, spread: float, seed: int) -> tuple:
    """L2-normalised features around one random centre per class, with their labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, 16, generator=torch.Generator().manual_seed(99)))
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = spread * torch.randn(len(labels), 16, generator=generator)
    return F.normalize(centres[labels] + noise, dim=-1), labels


def test_separable_features_are_classified_perfectly() -> None:
    train, train_labels = clusters(30, 6, 0.1, seed=0)
    test, test_labels = clusters(10, 6, 0.1, seed=1)
    result = linear_probe(train, train_labels, test, test_labels)
    assert result.metrics["lp_acc1"] == 1.0
    assert result.metrics["lp_acc5"] == 1.0
    assert result.metrics["lp_mean_per_class_recall"] == 1.0
    assert result.metrics["weight_decay"] == result.weight_decay
    assert result.metrics["validation_acc1"] == result.validation_acc1[result.weight_decay]
    assert result.logits.shape == (60, 6)


def test_deterministic_and_the_sweep_picks_the_best_validation_score() -> None:
    train, train_labels = clusters(20, 4, 0.9, seed=2)  # overlapping: the decay matters
    test, test_labels = clusters(20, 4, 0.9, seed=3)
    first = linear_probe(train, train_labels, test, test_labels)
    second = linear_probe(train, train_labels, test, test_labels)
    assert torch.equal(first.logits, second.logits)
    assert first.metrics == pytest.approx(second.metrics, nan_ok=True)
    best = max(first.validation_acc1.values())
    assert first.validation_acc1[first.weight_decay] == best
    # ties go to the largest (most regularised) weight decay
    assert first.weight_decay == max(d for d, acc in first.validation_acc1.items() if acc == best)


def test_validation_split_is_stratified_seeded_and_disjoint() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    train, val = validation_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(16))
    assert torch.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]  # a singleton stays
    again, _ = validation_split(labels, 0.2, seed=0)
    assert torch.equal(train, again)
    assert not torch.equal(validation_split(labels, 0.2, seed=1)[1], val)
    with pytest.raises(ValueError, match="fraction"):
        validation_split(labels, 1.0)


def test_fit_matches_sklearn_logistic_regression() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    train, labels = clusters(25, 3, 0.8, seed=4)
    decay = 1e-2
    weight, bias = fit_logistic_regression(train, labels, 3, decay, max_iter=2000)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2, the same optimum for C = 1 / (decay * N)
    reference = sklearn.LogisticRegression(C=1 / (decay * len(labels)), tol=1e-10, max_iter=5000)
    reference.fit(train.double().numpy(), labels.numpy())
    ours = (train @ weight.T + bias).softmax(dim=1)
    theirs = torch.from_numpy(reference.predict_proba(train.double().numpy())).float()
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="training and test"):
        linear_probe(torch.zeros(0, 4), torch.zeros(0), torch.zeros(1, 4), torch.zeros(1))
