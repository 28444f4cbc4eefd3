"""Faults around checkpoints, injected in process on a tiny model: a fresh run pointed at a
folder that holds a run, a save killed midway (a torn checkpoint), a disk that fills up during
a save. Each must leave the previous checkpoint intact and resumable."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch

from vlp import run_folder
from vlp.config import Config
from vlp.models import create_model
from vlp.objectives import create_objective
from vlp.training import ResumeError, Trainer, create_accelerator, trainer_checkpoint
from vlp.training import checkpoint as ckpt

CAPTIONS = ["a red star", "a blue ring", "a cross", "a heart"]


def _trainer(out: Path, **train: object) -> Trainer:
    model, _, _, tokenizer = create_model("vlp-tiny-vit")
    config = Config()
    config.train.out_dir = str(out)
    config.train.report_to = []
    config.train.checkpoint_every = 1
    for key, value in train.items():
        setattr(config.train, key, value)
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(4, 3, 32, 32, generator=generator), "text": tokenizer(CAPTIONS)}
        for _ in range(3)
    ]
    return Trainer(
        config,
        model,
        create_objective("clip"),
        batches,
        accelerator=create_accelerator(out, log_with=None),
        model_info={},
    )


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path):
    """The bug: a 2-step run into a finished 30-step run's folder overwrote its config and
    metrics, and pruning deleted the new step 2 at once (the old step 30 sorted higher)."""
    old = _trainer(tmp_path, steps=30)
    old.step = 30
    old.save_checkpoint()
    (tmp_path / "metrics.jsonl").write_text('{"step": 30}\n')
    with pytest.raises(ResumeError) as refused:
        _trainer(tmp_path, steps=2).fit()
    message = str(refused.value)
    assert "step_00000030" in message and "\n" not in message
    for way_out in ("train.resume=latest", "train.out_dir", "train.overwrite=true"):
        assert way_out in message
    assert _names(tmp_path) == ["step_00000030"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 30}\n'

    result = _trainer(tmp_path, steps=2, overwrite=True).fit()
    assert result.step == 2 and _names(tmp_path) == ["step_00000001", "step_00000002"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert 30 not in steps


def test_pruning_keeps_the_checkpoints_of_another_run(tmp_path):
    """A run resumed from elsewhere into a folder with another run's higher step keeps its own
    newest checkpoints; the other run's are never touched."""
    other = _trainer(tmp_path / "other", steps=30)
    other.step = 30
    other.save_checkpoint()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "other" / "checkpoints" / "step_00000030").rename(
        tmp_path / "run" / "checkpoints" / "step_00000030"
    )
    trainer = _trainer(tmp_path / "run", steps=3, keep_checkpoints=1)
    for step in (1, 2, 3):
        trainer.step = step
        trainer.save_checkpoint()
    assert _names(tmp_path / "run") == ["step_00000003", "step_00000030"]
    assert ckpt.run_id_of(tmp_path / "run" / "checkpoints" / "step_00000003") == trainer.run_id


def test_a_save_killed_midway_leaves_the_previous_checkpoint_resumable(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, steps=3)
    trainer.step = 1
    trainer.save_checkpoint()
    # a kill during step 2's save: the write stops after the first files (no marker, no rename)
    monkeypatch.setattr(ckpt, "publish", lambda tmp, final: (_ for _ in ()).throw(SystemExit(9)))
    trainer.step = 2
    with pytest.raises(SystemExit):
        trainer.save_checkpoint()
    monkeypatch.undo()
    # and a directory renamed into place whose files never reached the disk (no marker)
    torn = tmp_path / "checkpoints" / "step_00000003"
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"step": 3')
    assert run_folder.resolve_resume("latest", tmp_path / "checkpoints").name == "step_00000001"
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        run_folder.resolve_resume(str(torn), tmp_path / "checkpoints")

    resumed = _trainer(tmp_path, steps=3, resume="latest")
    result = resumed.fit()
    assert result.step == 3
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # stale temporaries removed
    assert ckpt.run_id_of(tmp_path / "checkpoints" / "step_00000003") == trainer.run_id


def test_a_full_disk_during_a_save_names_the_checkpoint_and_keeps_the_previous(
    tmp_path, monkeypatch
):
    trainer = _trainer(tmp_path, steps=3)
    trainer.step = 1
    trainer.save_checkpoint()
    before = (tmp_path / "checkpoints" / "step_00000001" / "model.safetensors").read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_checkpoint, "save_file", full)
    trainer.step = 2
    with pytest.raises(trainer_checkpoint.CheckpointWriteError) as failed:
        trainer.save_checkpoint()
    message = str(failed.value)
    assert failed.value.errno == errno.ENOSPC
    assert str(tmp_path / "checkpoints" / "step_00000002") in message
    assert "No space left on device" in message and "step_00000001 is intact" in message
    assert _names(tmp_path) == ["step_00000001"]  # the temporary was removed, space given back
    after = (tmp_path / "checkpoints" / "step_00000001" / "model.safetensors").read_bytes()
    assert after == before
    monkeypatch.undo()
    assert _trainer(tmp_path, steps=3, resume="latest").fit().step == 3


def _full_disk_on_rank_0(rank: int, world: int, out: str) -> dict[str, object]:
    """Rank 0's weights file hits a full disk during step 2's save; then step 3 saves."""
    trainer = _trainer(Path(out), steps=3)
    trainer.step = 1
    trainer.save_checkpoint()
    failed: dict[str, object] = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        if rank == 0:

            def full(*args: object, **kwargs: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(trainer_checkpoint, "save_file", full)
        trainer.step = 2
        try:
            trainer.save_checkpoint()
        except trainer_checkpoint.CheckpointWriteError as error:
            failed = {"errno": error.errno, "message": str(error)}
    trainer.step = 3  # the ranks are still in step: the next save pairs its collectives
    trainer.save_checkpoint()
    return failed


@pytest.mark.slow
def test_a_full_disk_on_the_main_rank_stops_every_rank_at_once(tmp_path):
    """Before: rank 1 waited in the barrier after the write for the collective timeout."""
    from tests.ddp_helpers import run_on_ranks

    failed = run_on_ranks(_full_disk_on_rank_0, 2, str(tmp_path), timeout_s=60, torchrun_env=True)
    for outcome in failed:
        assert outcome["errno"] == errno.ENOSPC, failed
        assert "No space left on device (on rank 0)" in str(outcome["message"]), failed
        assert "step_00000001 is intact" in str(outcome["message"]), failed
    assert _names(tmp_path) == ["step_00000001", "step_00000003"]


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint_listed(tmp_path, monkeypatch):
    """Before: ``rmtree`` removed files in directory order, and a checkpoint missing its
    weights but still holding ``COMPLETE`` was listed (and resumable by name)."""
    trainer = _trainer(tmp_path, steps=3, keep_checkpoints=1)
    trainer.step = 1
    trainer.save_checkpoint()
    real_rmtree = ckpt.shutil.rmtree

    def crash_midway(path: Path, *args: object, **kwargs: object) -> None:
        if "step_00000001" not in str(path):
            return real_rmtree(path, *args, **kwargs)
        (Path(path) / "model.safetensors").unlink()  # the first file gone, then a kill
        raise SystemExit(9)

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash_midway)
    trainer.step = 2
    with pytest.raises(SystemExit):
        trainer.save_checkpoint()  # written and renamed; pruning step 1 is interrupted
    monkeypatch.undo()
    listed = run_folder.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in listed] == ["step_00000002"]
    assert all((p / "model.safetensors").is_file() for p in listed)
    assert _trainer(tmp_path, steps=3, resume="latest").fit().step == 3
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the torn remains went too


def test_vlp_train_into_a_used_folder_stops_with_one_line(tmp_path, capsys):
    from data_pipelines.synthetic import generate_samples
    from data_pipelines.write import write_shards
    from launch.cli import main
    from tests.launch.test_pretrain import DEMO, _overrides

    write_shards(generate_samples(16, seed=0), tmp_path / "shards", samples_per_shard=16)
    out = tmp_path / "run"
    old = _trainer(out, steps=30)
    old.step = 30
    old.save_checkpoint()
    args = ["train", "--config", str(DEMO), *_overrides(tmp_path / "shards", out)]
    assert main([*args, "train.steps=2", "train.report_to=[]"]) == 2
    # the one line the user reads; the log lines of the start-up (threads chosen) may precede it
    printed = capsys.readouterr().err.strip().splitlines()
    error = [line for line in printed if not re.match(r"\d{4}-\d\d-\d\d \d\d:", line)]
    assert len(error) == 1 and "already holds a run" in error[0], printed
    assert "Traceback" not in "\n".join(printed)
    assert _names(out) == ["step_00000030"]
