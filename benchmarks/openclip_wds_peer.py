"""open_clip's own training data pipeline, timed: the peer side of ``data_throughput.py``.

Runs under ``.venv-openclip/bin/python`` (``make bench-peer``), because open_clip's trainer needs
``webdataset<=0.2.86`` and pandas, which conflict with vlp's environment; so it imports nothing
of vlp. Builds ``open_clip_train.data.get_wds_dataset`` with the arguments open_clip's
``main`` passes for ``--train-data URLS --dataset-resampled --batch-size B --workers W`` and the
default train preprocessing of a 224 px model (RandomResizedCrop(scale=(0.9, 1)), ToTensor,
Normalize), skips ``--warmup`` batches, times ``--batches`` more and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import open_clip
from open_clip_train.data import get_wds_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-data", required=True, help="shard URLs, brace-expandable")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=16, help="timed batches")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    args = SimpleNamespace(
        train_data=opts.train_data,
        val_data=None,
        dataset_resampled=True,
        train_num_samples=10**7,  # an "epoch" far longer than the run
        train_data_upsampling_factors=None,
        seed=opts.seed,
        batch_size=opts.batch_size,
        world_size=1,
        workers=opts.workers,
    )
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    loader = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader
    batches = iter(loader)
    for _ in range(opts.warmup):
        next(batches)
    started = time.perf_counter()
    for _ in range(opts.batches):
        images, _texts = next(batches)
    seconds = time.perf_counter() - started
    result = {
        "samples_per_s": opts.batches * opts.batch_size / seconds,
        "image_shape": list(images.shape),
        "image_dtype": str(images.dtype),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
