"""Optimizer state by parameter name: a parameter never stepped has none in the checkpoint and
none after loading; one without state that the checkpoint does not list is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlp.training import checkpoint as ckpt
from vlp.training.model_state import full_optimizer_state, load_full_optimizer_state


def _stepped(only: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A two-layer model whose optimizer stepped twice with a gradient for ``only``."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model[only](torch.randn(2, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _step_both(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3)
    (model["a"](x).sum() + model["b"](x).sum()).backward()
    optimizer.step()


def test_a_never_stepped_parameter_loads_without_state_and_continues_bitwise(tmp_path):
    model, optimizer = _stepped(only="a")
    ckpt.save_state_parts(tmp_path, "optimizer", full_optimizer_state(model, optimizer))
    state = ckpt.load_state_parts(tmp_path, "optimizer")  # not the live moments (aliases)
    assert set(state["state"]) == {"a.weight", "a.bias"}  # b listed in the group, no state
    resumed = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.1)
    load_full_optimizer_state(resumed, resumed_optimizer, state)
    assert not resumed_optimizer.state.get(resumed["b"].weight)
    _step_both(model, optimizer)
    _step_both(resumed, resumed_optimizer)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_a_parameter_the_checkpoint_does_not_list_is_refused():
    model, optimizer = _stepped(only="a")
    state = full_optimizer_state(model, optimizer)
    state["param_groups"][0]["params"] = ["a.weight", "a.bias", "b.weight"]  # b.bias unlisted
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no optimizer state for 1 parameters.*: b.bias$"):
        load_full_optimizer_state(model, fresh, state)
