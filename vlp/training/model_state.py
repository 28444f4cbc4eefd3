"""Model and optimizer state that is whole on disk, however the model is wrapped in memory.

A checkpoint holds full (unsharded) tensors keyed by parameter name, so that it resumes under
any wrapping and ``vlp export`` / open_clip read it. In memory the model may be plain, DDP, or
FSDP2 (``fully_shard``: every parameter a DTensor shard). ``torch.distributed.checkpoint``'s
state-dict API does the gathering (on every rank, a collective) and the re-sharding for all
three, so there is one code path:

- :func:`full_model_state` / :func:`full_optimizer_state`: collectives on every rank; the main
  process receives the full tensors on the CPU (with FSDP, other ranks receive ``{}``).
- :func:`load_full_model_state` / :func:`load_full_optimizer_state`: every rank passes the full
  state read from disk; each keeps its own shard.

FSDP refuses 0-dim parameters, and open_clip's ``logit_scale`` / ``logit_bias`` are 0-dim:
:func:`make_scalars_shardable` turns them into shape ``[1]`` before wrapping, and the state
functions turn them back, so what is on disk keeps open_clip's shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,  # the names its state dicts use, wrappers (DDP, compile) left out
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)
FORWARD_METHODS = ("encode_image", "encode_text")
"""Methods besides ``forward`` that evaluators call: under FSDP2 they must gather parameters."""


def make_scalars_shardable(model: nn.Module) -> list[str]:
    """Give every 0-dim parameter of ``model`` shape ``[1]`` (FSDP shards along dim 0 and
    refuses scalars); returns their names. Call before the optimizer is built."""
    names = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), param.requires_grad))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def register_forward_methods(model: nn.Module, methods: Iterable[str] = FORWARD_METHODS) -> None:
    """Let FSDP2 gather parameters for ``model.encode_image`` etc. as it does for ``forward``."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in methods:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)


def full_model_state(model: nn.Module, scalars: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The whole model's tensors by name, on the CPU (``{}`` on FSDP ranks other than 0).

    ``scalars`` (from :func:`make_scalars_shardable`) get their 0-dim shape back.
    """
    state: dict[str, torch.Tensor] = {
        k: v.contiguous()
        for k, v in get_model_state_dict(model, options=_GATHER).items()
        if isinstance(v, torch.Tensor)
    }
    for name in scalars:
        if name in state:
            state[name] = state[name].reshape(())
    return state


def load_full_model_state(
    model: nn.Module, state: dict[str, torch.Tensor], scalars: Iterable[str] = ()
) -> None:
    """Load a full state (from :func:`full_model_state`) into ``model``, sharded or not; every
    rank passes the same ``state``. Missing or unexpected keys raise."""
    state = dict(state)
    for name in scalars:
        if name in state:
            state[name] = state[name].reshape(1)
    set_model_state_dict(model, state, options=_SCATTER)  # type: ignore[arg-type]


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, scalars: Iterable[str] = ()
) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole, on the CPU (empty on FSDP ranks
    other than 0). Parameter names, not positions: the file outlives a reordering."""
    state: dict[str, Any] = dict(get_optimizer_state_dict(model, optimizer, options=_GATHER))
    _reshape_moments(state, scalars, ())
    return state


def load_full_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    scalars: Iterable[str] = (),
) -> None:
    """Load what :func:`full_optimizer_state` saved; every rank passes the same ``state``.

    A parameter the saved optimizer lists but keeps no state for was never stepped (torch's
    optimizers create a parameter's state at its first step with a gradient: ProtoCLIP's heads
    in its CLIP-only first episode, a tower frozen so far): it starts again with no state, as
    in the uninterrupted run. Any other parameter without saved state raises ``ValueError``.
    A checkpoint written before states were keyed by name (integer ids) loads as it was saved.
    """
    groups = state.get("param_groups", [])
    if any(isinstance(p, int) for group in groups for p in group.get("params", [])):
        optimizer.load_state_dict(state)
        return
    _reshape_moments(state, scalars, (1,))
    saved = state.get("state", {})
    never_stepped = {n for group in groups for n in group.get("params", []) if n not in saved}
    if not never_stepped:
        set_optimizer_state_dict(model, optimizer, state, options=_SCATTER)
        return
    names = {id(p): _get_fqns(model, name) for name, p in model.named_parameters()}
    trained = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if unlisted := sorted(n for p in trained for n in names[id(p)] - never_stepped - set(saved)):
        raise ValueError(
            f"the checkpoint has no optimizer state for {len(unlisted)} parameters it does not "
            f"list either (a checkpoint of another model?): {', '.join(unlisted[:8])}"
        )
    # torch refuses a trainable parameter without state unless strict=False, and then keeps the
    # zero state of its own initializing step (step 1) for it: drop that, as it never stepped
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state, options=options)
    for param in trained:
        if names[id(param)] <= never_stepped:
            optimizer.state.pop(param, None)


def _reshape_moments(state: dict[str, Any], scalars: Iterable[str], shape: tuple[int, ...]) -> None:
    """Give the per-parameter moments of the ``scalars`` parameters ``shape``, in place."""
    per_param = state.get("state", {})
    for name in scalars:
        for key, value in per_param.get(name, {}).items():
            if torch.is_tensor(value) and value.numel() == 1 and key != "step":
                per_param[name][key] = value.reshape(shape)
