"""Labelled evaluation sets read from shards (``cls`` + image + ``txt`` per sample)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image


@dataclass
class LabelledSet:
    """Preprocessed images with class labels and one caption each, held in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    keys: list[str]


def load_labelled_shards(
    urls: Sequence[str],
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    limit: int | None = None,
) -> LabelledSet:
    """Read every sample of ``urls`` in order (no shuffling, no rank split) into memory.

    Meant for small held-out sets (the demo's, smoke evals); large benchmarks stream instead.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.to_tuple("__key__", "jpg;jpeg;png;webp", "cls", "txt"),
    )
    keys, images, labels, captions = [], [], [], []
    for key, image, label, caption in pipeline:
        keys.append(key)
        images.append(preprocess(image))
        labels.append(int(label))
        captions.append(caption)
        if limit is not None and len(keys) >= limit:
            break
    if not keys:
        raise ValueError(f"no labelled samples (image + cls + txt) in {list(urls)[:3]}...")
    return LabelledSet(torch.stack(images), torch.tensor(labels), captions, keys)
