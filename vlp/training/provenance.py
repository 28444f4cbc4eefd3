"""What produced a run: package versions, git commit, processes, accelerate settings, batch."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "transformers",
    "webdataset",
    "accelerate",
    "fsspec",
    "safetensors",
    "numpy",
    "pillow",
    "vlp",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages whose behaviour shapes a run (None if absent)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the checkout vlp runs from (with ``-dirty`` if it has local changes)."""
    path = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(accelerator: Any, global_batch: int) -> dict[str, Any]:
    """The provenance record written to ``provenance.json`` in the run directory."""
    return {
        "packages": package_versions(),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "accelerate_env": {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")},
        "global_batch": global_batch,
    }
