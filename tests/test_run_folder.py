"""vlp.run_folder: checkpoint names, the COMPLETE marker, listing oldest first, ``latest``."""

from __future__ import annotations

import pytest

from vlp import run_folder
from vlp.run_folder import (
    checkpoint_name,
    checkpoints_dir,
    list_checkpoints,
    resolve_resume,
    step_of,
)


def _checkpoint(run, step: int, *, complete: bool = True):
    path = checkpoints_dir(run) / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / run_folder.TRAINER_STATE).write_text("{}")
    if complete:
        (path / run_folder.COMPLETE).write_text("")
    return path


@pytest.mark.parametrize("step", [0, 7, 100, 12345678, 10**9])
def test_names_and_steps_round_trip(step) -> None:
    assert step_of(checkpoints_dir("run") / checkpoint_name(step)) == step
    assert checkpoint_name(100) == "step_00000100"


def test_only_complete_checkpoints_are_listed_by_step_not_by_name(tmp_path) -> None:
    for step in (10**8, 9, 2 * 10**7):  # 10**8 has 9 digits: by name it sorts before 2 * 10**7
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 40, complete=False)  # torn: renamed, never marked
    (checkpoints_dir(tmp_path) / f".tmp-{checkpoint_name(50)}").mkdir()  # a save in progress
    (checkpoints_dir(tmp_path) / "notes.txt").write_text("")
    listed = list_checkpoints(checkpoints_dir(tmp_path))
    assert [step_of(p) for p in listed] == [9, 2 * 10**7, 10**8]
    assert resolve_resume("latest", checkpoints_dir(tmp_path)) == _path(tmp_path, 10**8)


def test_a_run_without_checkpoints_lists_none(tmp_path) -> None:
    assert list_checkpoints(checkpoints_dir(tmp_path / "missing")) == []
    assert resolve_resume("latest", checkpoints_dir(tmp_path / "missing")) is None


def test_resume_by_path_needs_a_complete_checkpoint(tmp_path) -> None:
    done = _checkpoint(tmp_path, 1)
    torn = _checkpoint(tmp_path, 2, complete=False)
    assert resolve_resume(str(done), checkpoints_dir(tmp_path)) == done
    for bad in (torn, tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint.*COMPLETE"):
            resolve_resume(str(bad), checkpoints_dir(tmp_path))


def _path(run, step: int):
    return checkpoints_dir(run) / checkpoint_name(step)
