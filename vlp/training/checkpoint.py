"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint directory ``checkpoints/step_00000100`` is written under a hidden temporary name,
closed with a ``COMPLETE`` marker, flushed to disk (``fsync`` of every file and of the
directories) and renamed; only directories holding the marker are listed (:mod:`vlp.run_folder`
reads the layout: names, marker, listing, ``latest``), so a crash, a kill or a power loss never
leaves a torn checkpoint that a resume would pick up. Each checkpoint records the
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

from vlp import atomic_files, run_folder
from vlp.atomic_files import atomic_write_text

TMP_PREFIX = ".tmp-"
"""A checkpoint is written under ``.tmp-step_N`` (never listed) and renamed when complete."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON (sorted keys, indented) atomically: a temporary file, then a rename."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def mark_complete(directory: Path) -> None:
    """Write the ``COMPLETE`` marker: the last file of a checkpoint, after all the others."""
    (directory / run_folder.COMPLETE).write_text("")


def publish(tmp: Path, final: Path) -> None:
    """Make the finished temporary checkpoint ``tmp`` durable, then rename it to ``final``.

    Files and directory are synced before the rename (so the renamed directory never points at
    unwritten data) and the parent after it (so the rename itself survives a power loss). The
    files get the umask's permissions (safetensors writes 0600), so teammates can read them.
    """
    mark_complete(tmp)
    atomic_files.normal_permissions(tmp)
    atomic_files.fsync_tree(tmp)
    atomic_files.fsync_path(tmp.parent)
    if final.exists():
        remove_checkpoint(final)
    os.replace(tmp, final)
    atomic_files.fsync_path(final.parent)


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint so that no crash leaves it half deleted yet listed: it is renamed to
    a temporary name first (atomic; never listed, removed by :func:`remove_stale_temporaries`
    if the deletion is interrupted), then deleted."""
    doomed = checkpoint.with_name(f"{TMP_PREFIX}{checkpoint.name}.removing")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def run_id_of(checkpoint: Path) -> str | None:
    """The ``run_id`` in a checkpoint's ``trainer_state.json``: ``""`` for checkpoints written
    before run ids existed (one lineage of their own), None when the state cannot be read."""
    try:
        state = json.loads((checkpoint / run_folder.TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return str(state.get("run_id", "")) if isinstance(state, dict) else None


def remove_stale_temporaries(checkpoint_dir: Path) -> None:
    """Remove ``.tmp-step_*`` directories: saves interrupted by a crash or a kill, never resumed."""
    for stale in Path(checkpoint_dir).glob(f"{TMP_PREFIX}{run_folder.PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def split_tensors(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
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


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`; integer-like dict keys become ints again (optimizer
    ids)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {
            (int(k) if k.isdigit() else k): join_tensors(v, tensors) for k, v in skeleton.items()
        }
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def save_state_parts(directory: Path, name: str, state: dict[str, Any]) -> None:
    """Write ``name.safetensors`` + ``name.json`` for a nested state dict."""
    tensors, skeleton = split_tensors(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", skeleton)


def load_state_parts(directory: Path, name: str) -> Any:
    """Read back what :func:`save_state_parts` wrote."""
    tensors = load_file(str(directory / f"{name}.safetensors"))
    skeleton = json.loads((directory / f"{name}.json").read_text())
    return join_tensors(skeleton, tensors)


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
        p
        for p in run_folder.list_checkpoints(checkpoint_dir)
        if run_folder.step_of(p) <= step and run_id_of(p) == run_id
    ]
    for old in ours[: max(len(ours) - keep, 0)]:
        if run_folder.step_of(old) < step:
            remove_checkpoint(old)
    remove_stale_temporaries(checkpoint_dir)
