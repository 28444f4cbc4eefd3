"""Checkpoint parts: pickle-free round trips of optimizer state and RNG states; listing."""

import random

import numpy as np
import torch

from vlp.training import checkpoint as ckpt


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ckpt.save_state_parts(tmp_path, "optimizer", optimizer.state_dict())
    restored = torch.optim.AdamW(model.parameters(), lr=5.0)
    restored.load_state_dict(ckpt.load_state_parts(tmp_path, "optimizer"))
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(restored.state_dict()["state"][key][name], value)
    assert restored.param_groups[0]["lr"] == 1e-2


def test_rng_states_round_trip(tmp_path):
    ckpt.save_state_parts(tmp_path, "rng", ckpt.rng_state())
    expected = (random.random(), float(np.random.rand()), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    ckpt.set_rng_state(ckpt.load_state_parts(tmp_path, "rng"))
    assert (random.random(), float(np.random.rand()), torch.rand(1)) == expected


def test_listing_ignores_temporaries_and_prunes(tmp_path):
    for step in (5, 10, 100):
        (tmp_path / ckpt.checkpoint_name(step)).mkdir()
    (tmp_path / f"{ckpt.TMP_PREFIX}{ckpt.checkpoint_name(200)}").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)][-1] == "step_00000100"
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000100"
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000100"]
    # the temporary of an interrupted save is stale once pruning runs, and is removed with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000100"]
