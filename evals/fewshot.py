"""Few-shot evaluation with a nearest-class-mean classifier on frozen features.

Seed paper: Janson et al. 2022, "A simple baseline that questions the use of pretrained models
in continual learning": a class is the mean of its training features and a sample goes to the
nearest mean; on good pretrained features this needs no training and rivals trained
classifiers. Here features are L2-normalised, each class mean is re-normalised, and "nearest"
is the highest cosine similarity (the logits are those cosines).

Example::

    shots = few_shot_indices(train_labels, k=5, seed=0)
    metrics = nearest_class_mean_metrics(train_feats[shots], train_labels[shots],
                                         test_feats, test_labels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evals.zeroshot import classification_metrics


def few_shot_indices(labels: Tensor, k: int, seed: int = 0) -> Tensor:
    """Indices of ``k`` samples of every class, drawn by a seeded permutation (sorted).

    Raises ValueError naming the classes with fewer than ``k`` samples.
    """
    if k <= 0:
        raise ValueError(f"k must be a positive number of shots, got {k}")
    generator = torch.Generator().manual_seed(seed)
    chosen: list[Tensor] = []
    short: list[int] = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < k:
            short.append(c)
            continue
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    if short:
        raise ValueError(f"classes {short[:10]} have fewer than {k} samples for {k}-shot")
    return torch.cat(chosen).sort().values


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Unit-norm mean [C, d] of each class's L2-normalised features.

    Raises ValueError when a class has no sample (its mean would be undefined).
    """
    labels = labels.long().to(features.device)
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or bool((counts == 0).any()):
        missing = (counts[:num_classes] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"every class needs a sample: classes {missing[:10]} have none, or labels exceed "
            f"{num_classes - 1}"
        )
    sums = torch.zeros(num_classes, features.shape[1], device=features.device)
    sums.index_add_(0, labels, F.normalize(features.float(), dim=-1))
    return F.normalize(sums / counts[:, None], dim=-1)


def nearest_class_mean_logits(means: Tensor, features: Tensor) -> Tensor:
    """Cosine similarity [N, C] of each (normalised) feature to each class mean."""
    return F.normalize(features.float(), dim=-1) @ means.T


def nearest_class_mean_metrics(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
) -> dict[str, float]:
    """``classification_metrics`` of the nearest-class-mean classifier, keys prefixed ``ncm_``."""
    classes = num_classes or int(train_labels.max()) + 1
    means = class_means(train_features, train_labels, classes)
    logits = nearest_class_mean_logits(means, test_features)
    return {f"ncm_{k}": v for k, v in classification_metrics(logits, test_labels).items()}
