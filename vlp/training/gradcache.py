"""Exact gradient accumulation for batch-coupled losses (GradCache, Gao et al. 2021).

Plain accumulation would give each micro-batch's contrastive loss only its own negatives. Here
the k micro-batches are (1) encoded without grad, (2) the objective's ``batch_loss`` runs once on
all k·b local embeddings (the contrastive core gathers across the group) with grad w.r.t. the
embeddings only, and (3) each micro-batch is encoded again WITH grad through the prepared (DDP /
FSDP) model, replaying the RNG state of its first encoding so dropout draws the same masks, and
back-propagates the cached embedding gradients plus its ``sample_loss``. The parameters get
exactly the gradient of one k times larger batch, at one micro-batch of activation memory and
one extra forward per micro-batch. Gradient sync happens on the last micro-batch only.

Per-sample outputs (first dim = micro-batch size) are concatenated; other outputs (the logit
scale and bias) are the same for every micro-batch and get 1/k of their cached gradient in each
replay, so they accumulate it whole and DDP averages it with the rest.
Not exact with BatchNorm: its batch statistics are per micro-batch and the first, grad-free
encoding updates its running statistics too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.objectives import Objective

Tensors = dict[str, torch.Tensor]
Batch = dict[str, Any]


@dataclass
class CachedLoss:
    """What step (2) leaves for the replay: loss parts, embedding gradients, RNG states."""

    parts: Tensors
    """The objective's ``batch_loss`` terms (detached), for the finiteness check and logs."""
    loss: torch.Tensor
    """Sum of the ``*_loss`` terms (detached)."""
    grads: Tensors
    """Gradient of that sum w.r.t. every model output (per-sample outputs concatenated)."""
    shared: Tensors
    """Outputs that are not per sample (logit scale and bias), detached, for the logs."""
    rng_states: list[Any]
    sizes: list[int]


def _rng_state(device: torch.device) -> Any:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: Any, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _forward(model: nn.Module, batch: Batch) -> Tensors:
    return dict(model(image=batch["image"], text=batch["text"]))


def _is_per_sample(value: torch.Tensor, size: int) -> bool:
    return value.ndim >= 1 and value.shape[0] == size


def cached_batch_loss(
    model: nn.Module,
    objective: Objective,
    micro_batches: Sequence[Batch],
    *,
    autocast: Callable[[], AbstractContextManager[Any]],
    device: torch.device,
) -> CachedLoss:
    """Steps (1) and (2): encode every micro-batch without grad, then the coupled loss on all.

    Raises whatever the objective raises (e.g. ``NonFiniteFeaturesError``) before any gradient
    reaches the model, so a caller can skip the step on every rank.
    """
    rng_states, encoded = [], []
    with torch.no_grad():
        for batch in micro_batches:
            rng_states.append(_rng_state(device))
            with autocast():
                encoded.append(_forward(model, batch))
    after = _rng_state(device)
    sizes = [len(batch["image"]) for batch in micro_batches]
    features: Tensors = {}
    for key, first in encoded[0].items():
        if _is_per_sample(first, sizes[0]):
            value = torch.cat([outputs[key] for outputs in encoded])
        else:
            value = first
        # Embedding gradients are kept in float32 (float64 stays): half precision would
        # underflow the ~s/B entries of a large batch.
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        features[key] = value.detach().to(dtype).requires_grad_(value.is_floating_point())
    with autocast():
        parts = objective.batch_loss(features)
    loss = torch.stack([v for k, v in parts.items() if k.endswith("_loss")]).sum()
    leaves = [v for v in features.values() if v.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    cached = {
        key: grad
        for key, grad in zip(
            [k for k, v in features.items() if v.requires_grad], grads, strict=True
        )
        if grad is not None
    }
    _set_rng_state(after, device)
    detached = {k: v.detach() for k, v in parts.items()}
    shared = {k: v.detach() for k, v in encoded[0].items() if not _is_per_sample(v, sizes[0])}
    return CachedLoss(detached, loss.detach(), cached, shared, rng_states, sizes)


def replay_backward(
    model: nn.Module,
    objective: Objective,
    micro_batches: Sequence[Batch],
    cached: CachedLoss,
    *,
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[nn.Module], AbstractContextManager[Any]],
    autocast: Callable[[], AbstractContextManager[Any]],
    device: torch.device,
) -> Tensors:
    """Step (3): re-encode each micro-batch with grad and back-propagate the cached gradients.

    Returns the mean over micro-batches of the ``sample_loss`` terms (detached).
    """
    after = _rng_state(device)
    k = len(micro_batches)
    sample_parts: dict[str, list[torch.Tensor]] = {}
    start = 0
    for index, (batch, state, size) in enumerate(
        zip(micro_batches, cached.rng_states, cached.sizes, strict=True)
    ):
        last = index == k - 1
        _set_rng_state(state, device)
        with nullcontext() if last else no_sync(model), autocast():
            outputs = _forward(model, batch)
            terms = []
            for key, grad in cached.grads.items():
                value = outputs[key]
                if _is_per_sample(value, size):
                    terms.append((value * grad[start : start + size].to(value.dtype)).sum())
                else:
                    terms.append((value * grad.to(value.dtype)).sum() / k)
            parts = objective.sample_loss(outputs, batch)
            for key, value in parts.items():
                sample_parts.setdefault(key, []).append(value.detach())
            terms.extend(v / k for key, v in parts.items() if key.endswith("_loss"))
            surrogate = torch.stack([t.float() for t in terms]).sum()
        backward(surrogate)
        start += size
    _set_rng_state(after, device)
    return {key: torch.stack(values).mean() for key, values in sample_parts.items()}
