"""The worker stream's per-sample seeding: without DataLoader workers (``data.workers=0``) the
stream runs in the trainer's process and must leave that process's generators alone."""

from __future__ import annotations

import random
from itertools import islice
from typing import Any

import pytest
import torch
from torchvision import transforms

from data_pipelines.transforms import TrainTransform

from .conftest import make_stream


def _augment() -> transforms.Compose:
    """Random crops and flips: they draw from torch's generator for every sample."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(16, scale=(0.3, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )


def _batches(urls: str, workers: int, n: int = 3) -> list[dict]:
    stream = make_stream(urls, _augment(), batch_size=4, shuffle_buffer=6, workers=workers)
    return list(islice(stream, n))


@pytest.mark.parametrize("resampled", [True, False])
def test_no_workers_leave_the_trainers_generators_alone(shard_dir: str, resampled: bool) -> None:
    """Before: each sample reseeded ``torch.default_generator``, so the trainer's dropout drew
    from the last sample's augmentation seed."""
    torch.manual_seed(1234)
    random.seed(99)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    stream = make_stream(
        shard_dir, _augment(), batch_size=4, shuffle_buffer=6, workers=0, resampled=resampled
    )
    assert len(list(islice(stream, 3))) == 3
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


@pytest.mark.slow
def test_no_workers_augment_as_a_worker_process_does(shard_dir: str) -> None:
    """The augmentations still come from the per-sample seeds alone: the main process's batches
    are the ones a DataLoader worker makes, whatever the trainer's generator holds."""
    torch.manual_seed(5)
    in_worker = _batches(shard_dir, workers=1)
    torch.manual_seed(6)
    in_main = _batches(shard_dir, workers=0)
    for a, b in zip(in_worker, in_main, strict=True):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["image"], b["image"])


def test_a_worker_stacks_its_images_straight_into_shared_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the images were stacked in private memory and copied into shared memory again
    when the batch was sent, two fresh buffers faulted in per batch. In the main process
    (``data.workers=0``) nothing is shared."""
    from data_pipelines import worker_stream
    from data_pipelines.batch_fields import BatchFields

    fields = BatchFields.single(lambda image: image, lambda texts: torch.zeros(len(texts), 4))
    samples = [
        {"__key__": str(i), "image": torch.full((3, 5, 4), i, dtype=torch.uint8), "text": "t"}
        for i in range(3)
    ]
    in_main = worker_stream._collate(samples, fields, ())
    monkeypatch.setattr(worker_stream, "get_worker_info", lambda: object())
    in_worker = worker_stream._collate(samples, fields, ())
    assert in_worker["image"].is_shared() and not in_main["image"].is_shared()
    assert in_worker["image"].dtype == torch.uint8
    assert torch.equal(in_worker["image"], in_main["image"])
    assert torch.equal(in_worker["image"], torch.stack([s["image"] for s in samples]))


class _Recording:
    """A crop that records the type of each image it is given; ``takes_arrays`` as set."""

    def __init__(self, takes_arrays: bool) -> None:
        self.takes_arrays, self.crop, self.seen = takes_arrays, TrainTransform((16, 16)), set()

    def __call__(self, image: Any) -> torch.Tensor:
        self.seen.add(type(image).__name__)
        return self.crop(image)


def test_views_that_take_arrays_get_the_same_batches_from_the_fast_jpeg_path(
    shard_dir: str,
) -> None:
    batches = {}
    for takes_arrays in (True, False):
        view = _Recording(takes_arrays)
        stream = make_stream(shard_dir, view, batch_size=4, shuffle_buffer=6, workers=0)
        batches[takes_arrays] = list(islice(stream, 5))
        assert view.seen == ({"ndarray"} if takes_arrays else {"JpegImageFile"}), view.seen
    for fast, pil in zip(batches[True], batches[False], strict=True):
        assert fast["__key__"] == pil["__key__"]
        assert torch.equal(fast["image"], pil["image"])
