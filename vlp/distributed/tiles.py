"""Score this rank's rows against every rank's columns, tile by tile, without a b×M matrix.

The columns travel around the group (:class:`RingShift`) one rank's chunk at a time; inside a
chunk the score matrix ``rows @ columns.T`` is visited in tiles of at most ``tile × tile``.
The forward lets a loss fold each tile into running statistics (an online log-sum-exp); the
backward recomputes each tile, asks the loss for the gradient of the tile's raw scores, and
sends the columns' gradient around the ring with the columns so that it ends at its owner.
Memory: O(tile² + b·d) per rank, whatever the group's batch. Work is done in float32 for
half-precision inputs (and in float64 for float64 inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from vlp.distributed.collectives import RingShift

DEFAULT_TILE = 1024
"""Rows and columns per tile when the caller does not choose (a 4 MiB float32 tile)."""

TileVisitor = Callable[[int, slice, slice, torch.Tensor], None]
"""``visit(owner, rows, columns, raw)``: ``raw = rows_tile @ columns_tile.T`` of chunk ``owner``."""

TileGradient = Callable[[int, slice, slice, torch.Tensor], torch.Tensor]
"""Like :data:`TileVisitor`, returning the gradient of the loss w.r.t. ``raw``."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exact(like: torch.Tensor) -> torch.autocast:
    """Autocast off: the tiles are computed in the compute dtype even inside mixed precision."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _tile_pairs(rows: int, columns: int, tile: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, column slice) of every tile of a rows × columns block."""
    for start_c in range(0, columns, tile):
        for start_r in range(0, rows, tile):
            yield (
                slice(start_r, min(start_r + tile, rows)),
                slice(start_c, min(start_c + tile, columns)),
            )


def _ring_chunks(
    columns: torch.Tensor, ring: RingShift, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor]]:
    """(owner rank, its chunk in ``dtype``) for every rank of the ring, this rank's first.

    The next chunk is already on its way while the caller works on the current one.
    """
    chunk = columns
    for step in range(ring.size):
        arriving = ring.start([chunk]) if step < ring.size - 1 else None
        yield (ring.rank - step) % ring.size, chunk.to(dtype)
        if arriving is not None:
            chunk = arriving()[0]


def ring_forward(
    rows: torch.Tensor, columns: torch.Tensor, ring: RingShift, tile: int, visit: TileVisitor
) -> None:
    """Call ``visit`` on every tile of ``rows @ [columns of every rank].T``.

    ``rows`` is in the compute dtype; ``columns`` (this rank's chunk) travels in its own dtype.
    """
    with _exact(rows):
        for owner, work in _ring_chunks(columns, ring, rows.dtype):
            for rs, cs in _tile_pairs(rows.shape[0], work.shape[0], tile):
                visit(owner, rs, cs, rows[rs] @ work[cs].T)


def ring_backward(
    rows: torch.Tensor, columns: torch.Tensor, ring: RingShift, tile: int, grad: TileGradient
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss w.r.t. ``rows`` and this rank's ``columns`` from tile gradients.

    The columns' gradient sums the contributions of every rank of the group (each rank's loss
    sees every column): it travels with the chunk and is delivered to the chunk's owner.
    """
    d_rows = torch.zeros_like(rows)
    d_chunk = torch.zeros(columns.shape, dtype=rows.dtype, device=rows.device)
    with _exact(rows):
        for owner, work in _ring_chunks(columns, ring, rows.dtype):
            for rs, cs in _tile_pairs(rows.shape[0], work.shape[0], tile):
                d_raw = grad(owner, rs, cs, rows[rs] @ work[cs].T)
                d_rows[rs] += d_raw @ work[cs]
                d_chunk[cs] += d_raw.T @ rows[rs]
            d_chunk = ring.start([d_chunk])()[0]
    return d_rows, d_chunk
