"""The Accelerator every vlp run uses, with the settings that make CPU runs correct and fast."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import (
    LOGGER_TYPE_TO_CLASS,
    GeneralTracker,
    TensorBoardTracker,
    get_available_trackers,
)
from accelerate.utils import DistributedType, ProjectConfiguration

logger = logging.getLogger(__name__)


def create_trackers(report_to: Sequence[str], out_dir: str | Path) -> list[GeneralTracker | str]:
    """Accelerate trackers for ``train.report_to``; TensorBoard writes into ``OUT/tensorboard``.

    Raises ValueError naming the tracker that is unknown or whose package is not installed, so
    that a run stops at start-up rather than after its first logged step.
    """
    made: list[GeneralTracker | str] = []
    for name in report_to:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"train.report_to: unknown tracker '{name}'; accelerate knows "
                f"{sorted(LOGGER_TYPE_TO_CLASS)}"
            )
        if name == "tensorboard":
            made.append(TensorBoardTracker("tensorboard", str(out_dir)))
            continue
        if name not in {str(t) for t in get_available_trackers()}:
            # accelerate itself would drop it silently (a debug line) and log nothing
            raise ValueError(
                f"train.report_to: tracker '{name}' needs its package, which is not installed; "
                f"pip install it or drop '{name}' from train.report_to"
            )
        made.append(name)
    return made


def create_accelerator(
    out_dir: str | Path, log_with: Sequence[GeneralTracker | str] | None = None
) -> Accelerator:
    """An Accelerator for a run writing into ``out_dir``.

    - ``cpu=True`` when there is no GPU: with accelerate's ``MULTI_GPU`` + ``use_cpu`` launch
      config this is what turns N launched processes into N gloo ranks (without it each process
      sees world size 1).
    - Precision comes from the accelerate config (``mixed_precision``); on the CPU a request for
      fp16/bf16 is turned into fp32 with a warning, because CPU autocast is ~15× slower here.
    - The scheduler is stepped once per optimizer step (``train.steps`` counts optimizer steps),
      not once per process as accelerate does by default.
    """
    cpu = not torch.cuda.is_available()
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if cpu and precision != "no":
        logger.warning(
            "mixed_precision=%s was asked for on a CPU run; using fp32 instead (CPU autocast is "
            "about 15x slower than fp32 for these models)",
            precision,
        )
        precision = "no"
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with=list(log_with) if log_with else None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir)),
        step_scheduler_with_optimizer=False,
    )


def check_sharding(accelerator: Accelerator) -> None:
    """Refuse FSDP version 1: vlp's checkpoints, eval and GradCache are built on FSDP2
    (``fully_shard``), whose evaluation calls (``encode_image``) gather parameters; FSDP1's
    flat parameters would not be gathered outside ``forward``."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(
            f"FSDP version {version} is not supported; set fsdp_config.fsdp_version: 2 in the "
            "accelerate config (as launch/accelerate/fsdp_8.yaml does)"
        )
