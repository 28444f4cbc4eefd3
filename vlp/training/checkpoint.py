"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint directory ``checkpoints/step_00000100`` is written under a hidden temporary name and
renamed when complete, so a crash or preemption never leaves a half-written checkpoint that a
resume would pick up. Loading never unpickles (no ``torch.load``, no ``register_for_checkpointing``).
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


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"{PREFIX}{step:08d}"


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(resume: str, checkpoint_dir: str | Path) -> Path | None:
    """``latest`` → the newest complete checkpoint (None if there is none); else that path."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"train.resume='{resume}' is not a complete checkpoint directory "
            "(no trainer_state.json); use 'latest' or a checkpoints/step_* directory"
        )
    return path


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


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale temporaries.

    Called after a save has been renamed into place, so any ``.tmp-step_*`` left is from a save
    that was interrupted (a crash or a kill) and will never complete.
    """
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(checkpoint_dir).glob(f"{TMP_PREFIX}{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
