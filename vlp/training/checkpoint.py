"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint directory ``checkpoints/step_00000100`` is written under a hidden temporary name,
closed with a ``COMPLETE`` marker, flushed to disk (``fsync`` of every file and of the
directories) and renamed; only directories holding the marker are listed, so a crash, a kill or a
power loss never leaves a torn checkpoint that a resume would pick up. Each checkpoint records the
``run_id`` of its run, and pruning removes only older checkpoints of the same run. Loading never
unpickles (no ``torch.load``, no ``register_for_checkpointing``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
COMPLETE = "COMPLETE"
"""The marker file written last into a checkpoint; a directory without it is torn."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"{PREFIX}{step:08d}"


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable only once its
    directory is synced). Filesystems that cannot sync a directory are tolerated."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then the directories, deepest first."""
    directories = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        directories += [Path(dirpath) / name for name in dirnames]
    for directory in reversed(directories):
        fsync_path(directory)


def mark_complete(directory: Path) -> None:
    """Write the ``COMPLETE`` marker: the last file of a checkpoint, after all the others."""
    (directory / COMPLETE).write_text("")


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint whose write finished (it holds the marker)."""
    return (directory / COMPLETE).is_file()


def publish(tmp: Path, final: Path) -> None:
    """Make the finished temporary checkpoint ``tmp`` durable, then rename it to ``final``.

    Files and directory are synced before the rename (so the renamed directory never points at
    unwritten data) and the parent after it (so the rename itself survives a power loss).
    """
    mark_complete(tmp)
    fsync_tree(tmp)
    fsync_path(tmp.parent)
    if final.exists():
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint so that no crash leaves it half deleted yet listed: it is renamed to
    a temporary name first (atomic; never listed, removed by :func:`remove_stale_temporaries`
    if the deletion is interrupted), then deleted."""
    doomed = checkpoint.with_name(f"{TMP_PREFIX}{checkpoint.name}.removing")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries and torn directories are never listed)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)
    ]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    """The step in a checkpoint directory's name (``step_00000100`` → 100)."""
    return int(checkpoint.name[len(PREFIX) :])


def resolve_resume(resume: str, checkpoint_dir: str | Path) -> Path | None:
    """``latest`` → the newest complete checkpoint (None if there is none); else that path."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() or not is_complete(path):
        raise FileNotFoundError(
            f"train.resume='{resume}' is not a complete checkpoint directory "
            f"(no trainer_state.json or no {COMPLETE} marker: its write did not finish); "
            "use 'latest' or a complete checkpoints/step_* directory"
        )
    return path


def run_id_of(checkpoint: Path) -> str | None:
    """The ``run_id`` in a checkpoint's ``trainer_state.json``: ``""`` for checkpoints written
    before run ids existed (one lineage of their own), None when the state cannot be read."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return str(state.get("run_id", "")) if isinstance(state, dict) else None


def remove_stale_temporaries(checkpoint_dir: Path) -> None:
    """Remove ``.tmp-step_*`` directories: saves interrupted by a crash or a kill, never resumed."""
    for stale in Path(checkpoint_dir).glob(f"{TMP_PREFIX}{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def split_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Separate tensors (for safetensors, keyed by dotted path) from the JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    return tensors, walk(state, prefix)


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`; integer-like dict keys become ints again (optimizer ids)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {(int(k) if k.isdigit() else k): join_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    return skeleton


def save_state_parts(directory: Path, name: str, state: dict[str, Any]) -> None:
    """Write ``name.safetensors`` + ``name.json`` for a nested state dict."""
    tensors, skeleton = split_state(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", skeleton)


def load_state_parts(directory: Path, name: str) -> Any:
    """Read back what :func:`save_state_parts` wrote."""
    tensors = load_file(str(directory / f"{name}.safetensors"))
    skeleton = json.loads((directory / f"{name}.json").read_text())
    return join_state(skeleton, tensors)


def rng_state() -> dict[str, Any]:
    """Every random generator the loop draws from (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": _to_json(random.getstate()),
        "numpy": _to_json(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def prune_checkpoints(checkpoint_dir: Path, keep: int, run_id: str, step: int) -> None:
    """Keep the newest ``keep`` checkpoints of run ``run_id`` up to ``step``; remove stale temporaries.

    Only checkpoints of this run's lineage (same ``run_id``, a lower step than the one just
    written) are ever deleted: another run's checkpoints in the same folder are left alone, so
    an older run's higher step never pushes this run's newest checkpoint out. Called after a save
    has been renamed into place, so any ``.tmp-step_*`` left is from a save that was interrupted
    (a crash or a kill) and will never complete.
    """
    ours = [
        p for p in list_checkpoints(checkpoint_dir) if step_of(p) <= step and run_id_of(p) == run_id
    ]
    for old in ours[: max(len(ours) - keep, 0)]:
        if step_of(old) < step:
            remove_checkpoint(old)
    remove_stale_temporaries(checkpoint_dir)
