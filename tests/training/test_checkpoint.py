"""Checkpoint parts: pickle-free round trips of optimizer state and RNG states; listing,
durability (marker, fsync) and pruning by run."""

import os
import random
import stat
from pathlib import Path

import numpy as np
import torch

from vlp import atomic_files, run_folder
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
        _complete(tmp_path / run_folder.checkpoint_name(step), run_id="a")
    (tmp_path / f"{ckpt.TMP_PREFIX}{run_folder.checkpoint_name(200)}").mkdir()
    assert [p.name for p in run_folder.list_checkpoints(tmp_path)][-1] == "step_00000100"
    assert run_folder.resolve_resume("latest", tmp_path).name == "step_00000100"
    ckpt.prune_checkpoints(tmp_path, keep=1, run_id="a", step=100)
    assert [p.name for p in run_folder.list_checkpoints(tmp_path)] == ["step_00000100"]
    # the temporary of an interrupted save is stale once pruning runs, and is removed with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000100"]


def _complete(directory, run_id):
    directory.mkdir()
    ckpt.write_json(directory / "trainer_state.json", {"run_id": run_id})
    ckpt.mark_complete(directory)


def test_a_checkpoint_without_its_marker_is_never_listed(tmp_path):
    _complete(tmp_path / run_folder.checkpoint_name(1), run_id="a")
    # renamed, but its files never reached the disk
    (tmp_path / run_folder.checkpoint_name(2)).mkdir()
    assert [p.name for p in run_folder.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert run_folder.resolve_resume("latest", tmp_path).name == "step_00000001"


def test_pruning_removes_only_older_checkpoints_of_the_same_run(tmp_path):
    for step, run_id in ((1, "new"), (2, "new"), (3, "new"), (30, "old"), (4, "")):
        _complete(tmp_path / run_folder.checkpoint_name(step), run_id=run_id)
    ckpt.prune_checkpoints(tmp_path, keep=1, run_id="new", step=2)
    names = [p.name for p in run_folder.list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000003", "step_00000004", "step_00000030"]


def test_publish_syncs_files_and_directories_around_the_rename(tmp_path, monkeypatch):
    tmp = tmp_path / f"{ckpt.TMP_PREFIX}{run_folder.checkpoint_name(7)}"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"weights")
    synced: list[str] = []
    real_fsync_path = atomic_files.fsync_path
    monkeypatch.setattr(
        atomic_files, "fsync_path", lambda p: (synced.append(Path(p).name), real_fsync_path(p))[1]
    )
    final = tmp_path / run_folder.checkpoint_name(7)
    ckpt.publish(tmp, final)
    assert run_folder.is_complete(final) and not tmp.exists()
    # files and the directory before the rename, the parent before and after it
    assert {"model.safetensors", run_folder.COMPLETE, tmp.name} <= set(synced[:-2])
    assert synced[-1] == tmp_path.name and tmp_path.name in synced[:-1]


def test_publish_gives_the_files_the_umask_permissions(tmp_path):
    """safetensors writes 0600: a checkpoint must be readable by teammates under umask 0022."""
    tmp = tmp_path / f"{ckpt.TMP_PREFIX}{run_folder.checkpoint_name(3)}"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"weights")
    (tmp / "model.safetensors").chmod(0o600)
    tmp.chmod(0o700)
    previous = os.umask(0o022)
    try:
        ckpt.publish(tmp, tmp_path / run_folder.checkpoint_name(3))
    finally:
        os.umask(previous)
    final = tmp_path / run_folder.checkpoint_name(3)
    assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
