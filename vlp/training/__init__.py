"""Training: the Accelerate loop, optimizer and schedule, checkpoints, provenance."""

from vlp.training.accel import create_accelerator
from vlp.training.loop import Evaluator, Trainer, TrainResult

__all__ = ["Evaluator", "TrainResult", "Trainer", "create_accelerator"]
