"""A checkpoint with never-stepped parameters resumes exactly under FSDP2 on 2 gloo CPU processes.

torch's optimizers create a parameter's state at its first step with a gradient, so a checkpoint
of ProtoCLIP's first episode holds none for its heads, nor for an image tower frozen so far (a
LiT step): :func:`~vlp.training.model_state.load_full_optimizer_state` gives them none again.
Here the first of three AdamW steps drops the image tower's gradients (as a LiT episode does);
the run resumed from the checkpoint after it, on a model and optimizer sharded with
``fully_shard`` (``test_fsdp.py``'s sharding, steps and checkpoint files), must start the tower
with no optimizer state and give the uninterrupted run's losses and weights bit for bit
(float64).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tests.ddp_helpers import run_on_ranks
from tests.training.test_fsdp import _model, _optimizer, _shard, _step
from vlp.training import checkpoint as ckpt
from vlp.training.model_state import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
)

pytestmark = pytest.mark.slow


def _stepped(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``model``'s parameters that have optimizer state on this rank."""
    return sorted(name for name, p in model.named_parameters() if optimizer.state.get(p))


def _resume(rank: int, world: int, directory: str) -> dict:
    """Three steps sharded, the first with the image tower frozen; a checkpoint after it; the
    last two again in a fresh sharded model loaded from it."""
    folder = Path(directory)
    whole = _model(0)
    scalars = _shard(whole)
    optimizer = _optimizer(whole)
    frozen = whole.get_submodule("visual").parameters()  # a LiT step
    out: dict = {"losses": [_step(whole, optimizer, seed=1, frozen=frozen)]}
    model_state = full_model_state(whole, scalars)
    optimizer_state = full_optimizer_state(whole, optimizer, scalars)
    if rank == 0:
        out["listed"] = sorted(n for g in optimizer_state["param_groups"] for n in g["params"])
        out["saved"] = sorted(optimizer_state["state"])
        save_file(model_state, str(folder / "model.safetensors"))
        ckpt.save_state_parts(folder, "optimizer", optimizer_state)
    dist.barrier()
    out["losses"] += [_step(whole, optimizer, seed=seed) for seed in (2, 3)]
    expected = full_model_state(whole, scalars)

    resumed = _model(7)  # other initial weights: everything must come from the files
    resumed_scalars = _shard(resumed)
    resumed_optimizer = _optimizer(resumed)
    load_full_model_state(resumed, load_file(str(folder / "model.safetensors")), resumed_scalars)
    saved = ckpt.load_state_parts(folder, "optimizer")
    load_full_optimizer_state(resumed, resumed_optimizer, saved, resumed_scalars)
    out["stepped_at_load"] = _stepped(resumed, resumed_optimizer)
    out["resumed_losses"] = [_step(resumed, resumed_optimizer, seed=seed) for seed in (2, 3)]
    out["stepped_at_end"] = _stepped(resumed, resumed_optimizer)
    got = full_model_state(resumed, resumed_scalars)
    if rank == 0:
        assert got.keys() == expected.keys()
        out["weights_differ"] = [k for k, v in expected.items() if not torch.equal(got[k], v)]
        out["weights_moved"] = [
            k for k, v in expected.items() if not torch.equal(model_state[k], v)
        ]
        out["image_tower"] = sorted(k for k in expected if k.startswith("visual."))
    return out


def test_never_stepped_parameters_resume_under_fsdp_without_state_and_bitwise(tmp_path):
    results = run_on_ranks(_resume, 2, str(tmp_path))
    main = results[0]
    tower = set(main["image_tower"])
    assert tower
    # the checkpoint lists the image tower but holds no state for it, and state for the rest
    assert set(main["listed"]) - set(main["saved"]) == tower
    assert set(main["saved"]) == set(main["listed"]) - tower
    for result in results:  # every rank's shards: none for the tower, its own for the rest
        assert set(result["stepped_at_load"]) == set(main["saved"])
        assert set(result["stepped_at_end"]) == set(main["listed"])
        assert [loss.item() for loss in result["resumed_losses"]] == [
            loss.item() for loss in result["losses"][1:]
        ]
    assert tower <= set(main["weights_moved"])  # the tower did train after the checkpoint
    assert main["weights_differ"] == []
