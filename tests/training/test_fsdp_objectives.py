"""PyramidCLIP and PRIOR (CoCa) under real FSDP2 (``fully_shard``) on 2 gloo CPU processes, for
one SGD step, over the full batch and over GradCache's micro-batches.

Every rank holds the same batch and each objective's loss over it (no group): FSDP averages
the ranks' equal gradients, so the whole model after the step, gathered from the shards, must
equal the same model stepped unsharded in the process (float64). The models are those of
``test_shardable_heads.py``; the sharding is ``test_fsdp.py``'s (each open_clip block, then the
whole model, the scalars made shardable first).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.ddp_helpers import run_on_ranks
from tests.training.test_fsdp import _shard
from tests.training.test_shardable_heads import MODELS, _one_step
from vlp.training.model_state import full_model_state

pytestmark = pytest.mark.slow


def _train(rank: int, world: int, name: str, directory: str) -> dict:
    """One step unsharded and one sharded, full batch then GradCache; the largest differences."""
    out: dict = {}
    for accumulated in (False, True):
        torch.manual_seed(0)
        objective, reference, batch = MODELS[name](Path(directory) / f"{rank}-{accumulated}")
        sharded = copy.deepcopy(reference)
        scalars = _shard(sharded)
        out["sharded"] = all(isinstance(p, DTensor) for p in sharded.parameters())
        losses = [_one_step(model, objective, batch, accumulated) for model in (reference, sharded)]
        for model in (reference, sharded):
            torch.optim.SGD(model.parameters(), lr=0.5).step()
            objective.after_step(model)
        state = full_model_state(sharded, scalars)
        expected = reference.state_dict()
        if rank == 0:
            assert state.keys() == expected.keys()
            out[accumulated] = {
                "loss": (losses[1] - losses[0]).abs().item(),
                "shape": list(losses[1].shape),
                "params": max((state[k] - v).abs().max().item() for k, v in expected.items()),
            }
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_fsdp_step_equals_the_unsharded_step(name, tmp_path):
    result = run_on_ranks(_train, 2, name, str(tmp_path))[0]
    assert result["sharded"]
    for accumulated in (False, True):
        got = result[accumulated]
        assert got["shape"] == [] and got["loss"] < 1e-12, (accumulated, got)
        assert got["params"] < 1e-12, (accumulated, got)
