"""Training: the Accelerate loop, optimizer and schedule, checkpoints, provenance."""

from vlp.training.accel import create_accelerator, create_trackers
from vlp.training.loop import Evaluator, NonFiniteLossError, ResumeError, Trainer, TrainResult

__all__ = [
    "Evaluator",
    "NonFiniteLossError",
    "ResumeError",
    "TrainResult",
    "Trainer",
    "create_accelerator",
    "create_trackers",
]
