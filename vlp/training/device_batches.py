"""The loop's supply of micro-batches: epoch after epoch, moved to the device, images normalised.

The training stream is a plain iterable of batch dicts that ends with its epoch; the loop wants
``train.accum_steps`` micro-batches per optimizer step for as many steps as ``train.steps``
says, so the stream is iterated again whenever it ends. Images travel as uint8 pixels (4x fewer
bytes between processes and over the host-to-device copy than floats) and are normalised only
once they are on the device, or as normalised floats (``data.uint8_batches``). The copy does not
wait: from pinned memory (the stream pins on CUDA) it runs asynchronously on the current stream,
before the normalisation queued after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``device`` (without waiting); other values as is."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


class DeviceBatches:
    """Draws micro-batches from ``batches``, starting a new epoch whenever it ends.

    Args:
        batches: this rank's batch dicts; iterated now (after a resume restored its position).
        accum_steps: micro-batches per optimizer step (``train.accum_steps``).
        device: where the loop computes.
        views: the batch keys holding images (the objective's image views).
        image_transform: applied to each view on the device; None leaves the views as they come.
    """

    def __init__(
        self,
        batches: Iterable[dict[str, Any]],
        accum_steps: int,
        device: torch.device,
        views: Sequence[str],
        image_transform: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.batches = batches
        self.accum_steps = accum_steps
        self.device = device
        self.views = views
        self.image_transform = image_transform
        self._iterator: Iterator[dict[str, Any]] = iter(batches)

    def next(self, step: int) -> list[dict[str, Any]]:
        """The micro-batches of optimizer step ``step + 1``, on the device."""
        batches = [
            to_device(self._next_from_stream(step), self.device) for _ in range(self.accum_steps)
        ]
        if self.image_transform is not None:
            for batch in batches:
                for view in self.views:
                    batch[view] = self.image_transform(batch[view])
        return batches

    def position(self) -> dict[str, Any]:
        """The stream's position after the last micro-batch handed out (``state_dict``)."""
        return self.batches.state_dict()  # type: ignore[attr-defined]

    def rewind(self, position: dict[str, Any], *, fresh_views: bool = False) -> None:
        """Hand out again what came after ``position`` (a :meth:`position`): an episode's
        second pass reads the first one's samples again, with other augmented views when
        ``fresh_views`` (the stream's ``fresh_views()``), else the same. Prefetched batches
        are dropped."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()  # stops the data workers of the current pass
        self.batches.load_state_dict(position)  # type: ignore[attr-defined]
        if fresh_views:
            self.batches.fresh_views()  # type: ignore[attr-defined]
        self._iterator = iter(self.batches)

    def _next_from_stream(self, step: int) -> dict[str, Any]:
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.batches)
        try:
            return next(self._iterator)
        except StopIteration:
            raise RuntimeError(
                f"the training stream is empty at step {step} (a new epoch gave no batch)"
            ) from None
