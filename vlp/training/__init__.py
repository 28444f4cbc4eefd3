"""Training: the Accelerate loop, optimizer and schedule, checkpoints, provenance."""

from vlp.training.accel import create_accelerator, create_trackers
from vlp.training.evaluation import Evaluator
from vlp.training.loop import Trainer, TrainResult
from vlp.training.nonfinite import NonFiniteLossError
from vlp.training.trainer_checkpoint import CheckpointWriteError, ResumeError

__all__ = [
    "CheckpointWriteError",
    "Evaluator",
    "NonFiniteLossError",
    "ResumeError",
    "TrainResult",
    "Trainer",
    "create_accelerator",
    "create_trackers",
]
