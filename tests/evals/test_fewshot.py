"""Tests for evals.fewshot: shot selection and the nearest-class-mean classifier."""

from __future__ import annotations

import pytest
import torch

from evals.fewshot import (
    class_means,
    few_shot_indices,
    nearest_class_mean_logits,
    nearest_class_mean_metrics,
)
from tests.evals.test_linear_probe import clusters


def test_few_shot_indices_take_k_of_every_class_reproducibly() -> None:
    labels = torch.tensor([0, 1, 2] * 6)
    chosen = few_shot_indices(labels, 4, seed=3)
    assert torch.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert torch.equal(chosen, few_shot_indices(labels, 4, seed=3))
    assert not torch.equal(chosen, few_shot_indices(labels, 4, seed=4))
    with pytest.raises(ValueError, match=r"classes \[1\] have fewer than 2"):
        few_shot_indices(torch.tensor([0, 0, 1]), 2)


def test_class_means_by_hand() -> None:
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    means = class_means(features, torch.tensor([0, 0, 1]), 2)
    # class 0: mean([.6, .8], [1, 0]) = [.8, .4] -> [2, 1] / sqrt(5); class 1: [0, 1]
    expected = torch.tensor([[2.0, 1.0], [0.0, 5**0.5]]) / 5**0.5
    torch.testing.assert_close(means, expected)
    logits = nearest_class_mean_logits(means, torch.tensor([[0.0, 7.0]]))
    torch.testing.assert_close(logits, torch.tensor([[1 / 5**0.5, 1.0]]))  # cosines
    with pytest.raises(ValueError, match=r"classes \[1\] have none"):
        class_means(features, torch.tensor([0, 0, 2]), 3)


def test_five_shot_on_separable_features() -> None:
    train, train_labels = clusters(20, 8, 0.15, seed=0)
    test, test_labels = clusters(10, 8, 0.15, seed=1)
    shots = few_shot_indices(train_labels, 5)
    metrics = nearest_class_mean_metrics(train[shots], train_labels[shots], test, test_labels)
    assert set(metrics) == {"ncm_acc1", "ncm_acc5", "ncm_mean_per_class_recall"}
    assert metrics["ncm_acc1"] == 1.0
