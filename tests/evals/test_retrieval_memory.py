"""retrieval_metrics never holds the N_txt x N_img score matrix: peak RSS growth of a call,
measured in a fresh subprocess (``vlp.profiling.peak_rss_growth``), stays within a few score
chunks plus the features, far below the dense matrix CLIP_benchmark builds (~5 bytes/pair)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import torch
import torch.nn.functional as F
from evals.retrieval import retrieval_metrics
from vlp.profiling import peak_rss_growth

n_images, per_image, dim, chunk = (int(v) for v in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
index = torch.arange(n_images).repeat_interleave(per_image)
texts = F.normalize(images[index] + 0.5 * torch.randn(len(index), dim, generator=g), dim=-1)
retrieval_metrics(images[:64], texts[:128], index[:128] % 64)  # load kernels, spin up threads
metrics, grown = peak_rss_growth(lambda: retrieval_metrics(images, texts, index, chunk_size=chunk))
print(json.dumps({"bytes": grown, "recall": metrics["image_retrieval_recall@1"]}))
"""


@pytest.mark.slow
def test_memory_is_chunks_not_the_score_matrix() -> None:
    n_images, per_image, dim, chunk = 10_000, 2, 32, 256  # dense: 1 GB, bound: 79 MB
    n_texts = n_images * per_image
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(n_images), str(per_image), str(dim), str(chunk)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # measured: about 2.5 chunk-sized float blocks (scores, comparison buffer, transients);
    # allow 3, plus per-row vectors and 16 MiB of allocator slack
    bound = 4 * (3 * chunk * n_texts) + 64 * n_texts + 2**24
    dense = 5 * n_images * n_texts  # CB: float32 scores + bool positives
    assert result["bytes"] < bound < dense / 10, (result["bytes"], bound, dense)
    assert 0.0 < result["recall"] <= 1.0
