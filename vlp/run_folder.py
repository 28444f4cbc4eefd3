"""Reading a run folder's checkpoints: where they are, what they are named, which are complete.

A run (``train.out_dir``) keeps its checkpoints in ``RUN/checkpoints/step_00000100/``, one per
save, each closed by a ``COMPLETE`` marker written last (see :mod:`vlp.training.checkpoint`,
which writes them). Only marked directories are checkpoints: a save interrupted by a crash or
a kill (a hidden temporary, or a folder without the marker) is never listed.

This is the read-only knowledge that training (resume), evals (loading a run) and objectives
(PRIOR's reference run) share, so it sits below all three and imports nothing from vlp.
Example::

    newest = list_checkpoints(checkpoints_dir("runs/demo"))[-1]
    step_of(newest)  # 100
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINTS = "checkpoints"
"""The run folder's sub-folder holding the checkpoints."""
PREFIX = "step_"
"""Checkpoint directory names are ``step_`` and the step, 8 digits."""
COMPLETE = "COMPLETE"
"""The marker file written last into a checkpoint; a directory without it is torn."""
TRAINER_STATE = "trainer_state.json"
"""The checkpoint file holding step, scheduler, world size, global batch and run id."""


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The folder holding ``run_dir``'s checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"{PREFIX}{step:08d}"


def step_of(checkpoint: Path) -> int:
    """The step in a checkpoint directory's name (``step_00000100`` → 100)."""
    return int(checkpoint.name[len(PREFIX) :])


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint whose write finished (it holds the marker)."""
    return (directory / COMPLETE).is_file()


def list_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir`` (a run's :func:`checkpoints_dir`), oldest
    first; temporaries and torn directories are never listed, a missing folder lists none."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)
    ]
    return sorted(found, key=step_of)


def resolve_resume(resume: str, checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """``latest`` → the newest complete checkpoint (None if there is none); else that path,
    which must be a complete checkpoint.

    Raises:
        FileNotFoundError: ``resume`` names no complete checkpoint directory.
    """
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file() or not is_complete(path):
        raise FileNotFoundError(
            f"train.resume='{resume}' is not a complete checkpoint directory "
            f"(no {TRAINER_STATE} or no {COMPLETE} marker: its write did not finish); "
            "use 'latest' or a complete checkpoints/step_* directory"
        )
    return path
