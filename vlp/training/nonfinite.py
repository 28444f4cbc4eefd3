"""What the loop does with a non-finite loss: skip the step, count it, and stop after too many.

One NaN batch (a corrupt image, an overflow in half precision) should not end a long run, so the
step is skipped on every rank alike; a run that keeps producing NaNs has diverged, and going on
would only burn compute, so past ``train.max_nonfinite_steps`` skips in a row it stops with an
error that names the step, the loss parts and what to try.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """More than ``train.max_nonfinite_steps`` non-finite losses in a row; names the step and
    the loss parts."""


class NonFiniteSkips:
    """Counts the steps skipped for a non-finite loss: in all (``total``, saved in checkpoints)
    and in a row (reset by every finite step).

    Args:
        max_in_a_row: ``train.max_nonfinite_steps``; one more skip in a row raises.
        checkpoint_dir: named in the error, where the run can be resumed from.
        rank: this process's index, named in the error next to its loss parts.
    """

    def __init__(self, max_in_a_row: int, checkpoint_dir: Path, rank: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank
        self.total = 0
        self.in_a_row = 0

    def finite(self) -> None:
        """A step went through: the count in a row starts again."""
        self.in_a_row = 0

    def skip(self, step: int, parts: dict[str, torch.Tensor]) -> None:
        """Count step ``step`` (the one attempted) as skipped; past the limit in a row, raise
        :class:`NonFiniteLossError` with this rank's loss parts (``{}``: features not finite)."""
        self.total += 1
        self.in_a_row += 1
        losses = ", ".join(
            f"{k}={float(v.detach().float().mean()):.4g}"
            for k, v in parts.items()
            if k.endswith("_loss")
        )
        logger.warning("non-finite loss at step %d (%s); step skipped", step, losses)
        if self.in_a_row > self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row at step {step} (losses on rank "
                f"{self.rank}: {losses or 'features not finite'}; train.max_nonfinite_steps="
                f"{self.max_in_a_row}); the last checkpoint is in {self.checkpoint_dir}: lower "
                "optim.lr or check the data"
            )
