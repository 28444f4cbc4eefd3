"""Retrieval at scale: time and peak memory of ``evals.retrieval.retrieval_metrics`` on
synthetic embeddings (default 200k images x 200k captions, d=64), in this fresh process.

The dense method (CLIP_benchmark's: the whole score matrix and a boolean positives matrix,
~5 bytes per pair) would need 200 GB here; the chunked one needs a few score blocks. Peak RSS
growth is measured with ``vlp.profiling.peak_rss_growth`` around the call only (the features
exist before). Prints one line and writes ``benchmarks/results/retrieval_scale.json``.

    .venv/bin/python benchmarks/retrieval_scale.py [--images 200000] [--per-image 1] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from evals.retrieval import retrieval_metrics
from vlp.profiling import peak_rss_growth

RESULTS = Path(__file__).resolve().parent / "results" / "retrieval_scale.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--per-image", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, help="default: retrieval_metrics' own")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(args.images, args.dim, generator=generator), dim=-1)
    index = torch.arange(args.images).repeat_interleave(args.per_image)
    noise = torch.randn(len(index), args.dim, generator=generator)
    texts = F.normalize(images[index] + 0.7 * noise, dim=-1)

    started = time.perf_counter()
    metrics, grown = peak_rss_growth(
        lambda: retrieval_metrics(images, texts, index, (1, 5, 10), chunk_size=args.chunk_size)
    )
    seconds = time.perf_counter() - started
    pairs = args.images * len(index)
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": vars(args),
        "pairs": pairs,
        "seconds": seconds,
        "peak_rss_growth_bytes": grown,
        "dense_bytes_estimate": 5 * pairs,
        "metrics": metrics,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.images} images x {len(index)} captions (d={args.dim}): {seconds:.0f} s, "
        f"peak RSS growth {grown / 2**20:.0f} MiB (dense: {5 * pairs / 2**30:.0f} GiB); "
        f"recall@1 image {metrics['image_retrieval_recall@1']:.4f} "
        f"text {metrics['text_retrieval_recall@1']:.4f}"
    )


if __name__ == "__main__":
    main()
