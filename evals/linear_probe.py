"""Linear probe: multinomial logistic regression on frozen image features.

The probe is fitted by full-batch L-BFGS from zero weights on the objective
``mean cross-entropy + (weight_decay / 2) * ||W||^2`` (the bias is not penalised). The objective
is strictly convex for a positive weight decay, so the fit has one optimum and the result does
not depend on a random initialisation or batch order: the probe is deterministic. The weight
decay is chosen from a small sweep by accuracy on a validation split carved from the training
set (stratified, seeded), then the probe is refitted on the whole training set, as in CLIP's
linear-probe protocol (Radford et al. 2021, appendix A.3) and CLIP_benchmark's ``linear_probe``.

Result keys follow CLIP_benchmark: ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``,
``weight_decay``, plus ``validation_acc1`` of the chosen weight decay.

Example::

    result = linear_probe(train_features, train_labels, test_features, test_labels)
    result.metrics["lp_acc1"], result.weight_decay
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from evals.zeroshot import classification_metrics

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(10.0**e for e in range(-6, 3))
"""1e-6 ... 1e2, one value per decade."""
_PARALLEL_WORK = 1 << 22
"""Multiply-adds of one logits product below which a fit runs on one intra-op thread."""


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """Run small fits on one CPU thread, then restore the thread count.

    Why: L-BFGS makes hundreds of tiny kernel calls; on a busy machine the threads' hand-offs
    cost far more than they save (measured: 6 s with 2 threads vs 0.06 s with one for a
    9 x 128 few-shot probe). Large fits keep every thread.
    """
    previous = torch.get_num_threads()
    if work >= _PARALLEL_WORK or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class LinearProbeResult:
    """Test metrics and logits of the refitted probe, and the sweep that chose it."""

    metrics: dict[str, float]
    logits: Tensor
    weight_decay: float
    validation_acc1: dict[float, float]


def validation_split(labels: Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, validation): ``fraction`` of every class, at least one of each class
    with two or more samples, chosen by a seeded permutation (so the split is reproducible).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    train: list[Tensor] = []
    validation: list[Tensor] = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        validation.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(validation).sort().values


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float,
    *,
    max_iter: int = 100,
) -> tuple[Tensor, Tensor]:
    """Weights [C, d] and bias [C] minimising mean CE + (weight_decay / 2) ||W||^2.

    Full-batch L-BFGS with a strong-Wolfe line search, started from zeros, for at most
    ``max_iter`` iterations: with a tiny decay on separable features the optimum lies far out
    and L-BFGS would spend them all, while the accuracy has settled long before.
    """
    x = features.float()
    y = labels.long().to(x.device)
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(x.numel() * num_classes):
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(weight: Tensor, bias: Tensor, features: Tensor, labels: Tensor) -> float:
    predictions = (features.float() @ weight.T + bias).argmax(dim=1)
    return int((predictions == labels.to(predictions.device)).sum()) / len(labels)


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    validation_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
) -> LinearProbeResult:
    """Sweep ``weight_decays`` on a validation split of the training set, refit, test.

    Features are used as given (the evals pass L2-normalised ones, like CLIP_benchmark's
    default). Among equally accurate weight decays the largest (simplest probe) wins.
    """
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("the linear probe needs training and test samples")
    if len(weight_decays) == 0:
        raise ValueError("weight_decays is empty")
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train_idx, val_idx = validation_split(train_labels, validation_fraction, seed)
    scores: dict[float, float] = {}
    if len(val_idx) and len(weight_decays) > 1:
        for decay in weight_decays:
            weight, bias = fit_logistic_regression(
                train_features[train_idx],
                train_labels[train_idx],
                classes,
                decay,
                max_iter=max_iter,
            )
            scores[decay] = _accuracy(weight, bias, train_features[val_idx], train_labels[val_idx])
        best = max(sorted(scores, reverse=True), key=scores.__getitem__)
    else:
        best = weight_decays[0]
    weight, bias = fit_logistic_regression(
        train_features, train_labels, classes, best, max_iter=max_iter
    )
    logits = test_features.float() @ weight.T + bias
    metrics = {f"lp_{k}": v for k, v in classification_metrics(logits, test_labels).items()}
    metrics["weight_decay"] = best
    if scores:
        metrics["validation_acc1"] = scores[best]
    return LinearProbeResult(metrics, logits, best, scores)
