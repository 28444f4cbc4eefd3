"""Exact gradient accumulation for batch-coupled losses (GradCache, Gao et al. 2021).

Plain accumulation would give each micro-batch's contrastive loss only its own negatives. Here
the k micro-batches are (1) encoded without grad, (2) the objective's ``batch_loss`` runs once on
all k·b local embeddings (the contrastive core gathers across the group) with grad w.r.t. the
embeddings only, and (3) each micro-batch is encoded again WITH grad through the prepared (DDP /
FSDP) model, replaying the RNG state of its first encoding so dropout draws the same masks, and
back-propagates the cached embedding gradients plus its ``sample_loss``. The parameters get
exactly the gradient of one k times larger batch, at one micro-batch of activation memory and
one extra forward per micro-batch. Gradient sync happens on the last micro-batch only.

What is cached comes from the objective's declarations (``Objective.outputs``): ``Coupled``
outputs (embeddings) are concatenated over the micro-batches and cached in their declared dtype;
``Shared`` outputs (a learned scale or bias) are the same for every micro-batch and get 1/k of
their cached gradient in each replay, so they accumulate it whole and DDP averages it with the
rest; ``PerSample`` outputs (caption logits) are never cached: the first encoding drops them,
and only the replay's ``sample_loss`` sees them. An undeclared output is an error.
An objective without ``Coupled`` outputs couples no samples (``prior_reference``'s language
model): its micro-batches are accumulated plainly, one forward each in the replay, with no
grad-free encoding and no RNG replay.
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

from vlp.objectives import Objective, total_loss
from vlp.objectives.base import Coupled, Output, PerSample, Shared

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
    """Gradient of that sum w.r.t. every cached output (``Coupled`` ones concatenated)."""
    shared: Tensors
    """The ``Shared`` outputs (logit scale and bias), detached, for the logs."""
    rng_states: list[Any]
    """Each micro-batch's RNG state at its first encoding (None: no encoding, nothing to replay)."""
    sizes: list[int]


def _rng_state(device: torch.device) -> Any:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: Any, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _forward(model: nn.Module, objective: Objective, batch: Batch) -> Tensors:
    return dict(model(objective.model_inputs(batch)))


def _kinds(objective: Objective, outputs: Tensors) -> dict[str, Output]:
    """Each output's declared kind; an undeclared output is an error naming it."""
    undeclared = sorted(set(outputs) - set(objective.outputs))
    if undeclared:
        raise ValueError(
            f"objective {type(objective).__name__} returned outputs {undeclared} that its "
            "'outputs' declaration lacks (Coupled / Shared / PerSample)"
        )
    return {key: objective.outputs[key] for key in outputs}


def _cache_dtype(kind: Output, value: torch.Tensor) -> torch.dtype:
    declared = kind.dtype if isinstance(kind, Coupled) else None
    if declared is not None:
        return declared
    # float64 stays; half precision would underflow the ~s/B entries of a large batch
    return torch.float64 if value.dtype == torch.float64 else torch.float32


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
    if not any(isinstance(kind, Coupled) for kind in objective.outputs.values()):
        k = len(micro_batches)  # nothing couples the samples: the replay alone accumulates
        return CachedLoss({}, torch.zeros((), device=device), {}, {}, [None] * k, [0] * k)
    rng_states, encoded = [], []
    with torch.no_grad():
        for batch in micro_batches:
            rng_states.append(_rng_state(device))
            with autocast():
                outputs = _forward(model, objective, batch)
            kinds = _kinds(objective, outputs)
            encoded.append(
                {k: v for k, v in outputs.items() if not isinstance(kinds[k], PerSample)}
            )
    del outputs  # the last micro-batch's per-sample outputs (caption logits) are not kept
    after = _rng_state(device)
    coupled = [k for k, kind in kinds.items() if isinstance(kind, Coupled)]
    sizes = [len(outputs[coupled[0]]) for outputs in encoded]
    features: Tensors = {}
    for key, first in encoded[0].items():
        kind = kinds[key]
        value = torch.cat([o[key] for o in encoded]) if isinstance(kind, Coupled) else first
        features[key] = (
            value.detach().to(_cache_dtype(kind, value)).requires_grad_(value.is_floating_point())
        )
    with autocast():
        parts = objective.batch_loss(features)
    loss = total_loss(parts)
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
    shared = {k: v.detach() for k, v in encoded[0].items() if isinstance(kinds[k], Shared)}
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
    replay_rng = cached.rng_states[0] is not None
    after = _rng_state(device)
    k = len(micro_batches)
    sample_parts: dict[str, list[torch.Tensor]] = {}
    start = 0
    for index, (batch, state, size) in enumerate(
        zip(micro_batches, cached.rng_states, cached.sizes, strict=True)
    ):
        last = index == k - 1
        if replay_rng:
            _set_rng_state(state, device)
        with nullcontext() if last else no_sync(model), autocast():
            outputs = _forward(model, objective, batch)
            terms = []
            for key, grad in cached.grads.items():
                value = outputs[key]
                if isinstance(objective.outputs[key], Coupled):
                    terms.append((value * grad[start : start + size].to(value.dtype)).sum())
                else:
                    terms.append((value * grad.to(value.dtype)).sum() / k)
            parts = objective.sample_loss(outputs, batch)
            for key, value in parts.items():
                sample_parts.setdefault(key, []).append(value.detach())
            terms.extend(v / k for key, v in parts.items() if key.endswith("_loss"))
            surrogate = torch.stack([t.float().reshape(()) for t in terms]).sum()
        backward(surrogate)
        start += size
    if replay_rng:
        _set_rng_state(after, device)
    return {key: torch.stack(values).mean() for key, values in sample_parts.items()}
