"""The tiled core never holds a b×B matrix: peak RSS growth of one forward+backward, measured in
a fresh subprocess (``vlp.profiling.peak_rss_growth``), stays below c·(b·tile + B·d) floats.

c = 3 covers the few tile-sized buffers alive at once (scores, probabilities, their gradient)
and the feature gradients. The plain loss (B×B logits) is measured the same way and must exceed
the bound, which shows that the measurement sees such a matrix when there is one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

C = 3
FLOAT = 4
PROBE = r"""
import json, sys
import torch
import torch.nn.functional as F
from vlp.distributed import contrastive_loss
from vlp.profiling import peak_rss_growth

torch.set_num_threads(1)
kind, batch, width, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
z = F.normalize(torch.randn(batch, width, generator=g), dim=-1).requires_grad_()
w = F.normalize(torch.randn(batch, width, generator=g), dim=-1).requires_grad_()
s = torch.tensor(10.0, requires_grad=True)
contrastive_loss(z[:64], w[:64], s, tile_size=16).backward()  # load kernels, spin up threads
z.grad = w.grad = s.grad = None


def tiled():
    contrastive_loss(z, w, s, tile_size=tile).backward()


def plain():
    logits, targets = s * z @ w.T, torch.arange(batch)
    ((F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2).backward()


_, grown = peak_rss_growth(tiled if kind == "tiled" else plain)
print(json.dumps({"bytes": grown}))
"""


def _peak_growth(kind: str, batch: int, width: int, tile: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, kind, str(batch), str(width), str(tile)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return int(json.loads(done.stdout.strip().splitlines()[-1])["bytes"])


@pytest.mark.slow
@pytest.mark.parametrize("batch,tile", [(4096, 256), (4096, 1024), (8192, 256)])
def test_tiled_loss_memory_is_bounded_by_tiles_not_the_batch_squared(batch, tile):
    width = 64
    bound = C * (batch * tile + batch * width) * FLOAT
    grown = _peak_growth("tiled", batch, width, tile)
    assert grown < bound, f"{grown / 2**20:.1f} MiB >= bound {bound / 2**20:.1f} MiB"


@pytest.mark.slow
def test_the_measurement_sees_a_batch_squared_matrix():
    batch, width, tile = 4096, 64, 256
    bound = C * (batch * tile + batch * width) * FLOAT
    assert _peak_growth("plain", batch, width, tile) > 4 * bound  # 4096² floats = 64 MiB each
