"""Decode, preprocess and batch an :class:`~evals.eval_set.EvalSet`, then encode its images.

Images are decoded with the training stream's rules (:func:`data_pipelines.decode.decode_image`:
EXIF orientation applied, alpha composited on white, RGB), so a model is evaluated on images
decoded the way it was trained on them. An image that does not decode is reported, counted and
left out; the count travels with the batches so that results can state it.

``workers`` > 0 decodes in that many DataLoader processes; worker w takes the samples whose
position modulo ``workers`` is w (every worker walks the sample list, only its share is
decoded), so the set of evaluated samples does not depend on the worker count.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.decode import DATA_ERRORS, decode_image
from evals._model import encode_batches, encoder, inference, model_device
from evals.eval_set import EvalDataError, EvalSet, RawSample

logger = logging.getLogger(__name__)
MAX_REPORTED = 10


@dataclass
class Batch:
    """Preprocessed images [B, 3, H, W] with their samples, and the samples that failed."""

    images: Tensor
    samples: list[RawSample]
    skipped: list[tuple[str, str]]
    """(where, why) of each sample of this stretch whose image did not decode."""
    error: str | None = None
    """Why the dataset could not be read further (raised as EvalDataError by ``iter_batches``:
    an exception raised inside a DataLoader worker would reach the user wrapped in a traceback)."""


def decode_sample(sample: RawSample) -> Image.Image:
    """The sample's image, decoded with the training stream's rules."""
    if isinstance(sample.image, bytes):
        return decode_image(sample.image)
    with open(sample.image, "rb") as handle:
        return decode_image(handle.read())


def _identity(batch: Any) -> Any:
    """The DataLoader's collate function: batches are made in the workers already."""
    return batch


class _Batches(IterableDataset):
    """The worker-side iterable: this worker's share of the samples, decoded and batched."""

    def __init__(
        self, eval_set: EvalSet, preprocess: Callable[[Image.Image], Tensor], batch_size: int
    ) -> None:
        self.eval_set, self.preprocess, self.batch_size = eval_set, preprocess, batch_size

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        rank, count = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        images: list[Tensor] = []
        samples: list[RawSample] = []
        skipped: list[tuple[str, str]] = []
        try:
            for position, sample in enumerate(self.eval_set.read()):
                if position % count != rank:
                    continue
                self.eval_set.check_target(sample)
                try:
                    image = decode_sample(sample)
                except DATA_ERRORS as error:
                    skipped.append((sample.where, str(error)))
                    continue
                images.append(self.preprocess(image))
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield Batch(torch.stack(images), samples, skipped)
                    images, samples, skipped = [], [], []
        except EvalDataError as error:
            yield Batch(torch.zeros(0), [], skipped, str(error))
            return
        if samples or skipped:
            yield Batch(torch.stack(images) if images else torch.zeros(0), samples, skipped)


def iter_batches(
    eval_set: EvalSet,
    preprocess: Callable[[Image.Image], Tensor],
    *,
    batch_size: int = 256,
    workers: int = 0,
) -> Iterator[Batch]:
    """Yield batches of at most ``batch_size`` decoded, preprocessed images (see module doc)."""
    if batch_size <= 0 or workers < 0:
        raise ValueError(f"batch_size must be > 0 and workers >= 0, got {batch_size}, {workers}")
    dataset = _Batches(eval_set, preprocess, batch_size)
    batches: Iterable[Batch] = dataset
    if workers > 0:
        batches = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity)
    for batch in batches:
        if batch.error is not None:
            raise EvalDataError(batch.error)
        yield batch


@dataclass
class EncodedSet:
    """L2-normalised float32 image features (CPU) of the samples that decoded, in order."""

    features: Tensor
    samples: list[RawSample]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def targets(self) -> Tensor:
        """Labels [N] (classification) or 0/1 targets [N, C] (multilabel)."""
        return torch.tensor([sample.target for sample in self.samples])

    def captions(self) -> list[list[str]]:
        """The captions of each image (retrieval)."""
        return [list(sample.captions) for sample in self.samples]


def encode_eval_set(
    model: nn.Module,
    eval_set: EvalSet,
    preprocess: Callable[[Image.Image], Tensor],
    *,
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> EncodedSet:
    """Encode every decodable image of ``eval_set``; report the ones that do not decode.

    Raises EvalDataError when no image is left (an empty dataset, or none decodes).
    """
    samples: list[RawSample] = []
    skipped: list[tuple[str, str]] = []

    def images() -> Iterator[Tensor]:
        for batch in iter_batches(eval_set, preprocess, batch_size=batch_size, workers=workers):
            samples.extend(batch.samples)
            skipped.extend(batch.skipped)
            if batch.samples:
                yield batch.images

    stream = images()
    first = next(stream, None)
    if first is None:
        raise EvalDataError(
            f"{eval_set.source}: no image to evaluate"
            + (f" ({len(skipped)} did not decode)" if skipped else " (the dataset is empty)")
        )
    with inference(model):
        features = encode_batches(
            encoder(model, "encode_image"),
            itertools.chain([first], stream),
            model_device(model, device),
            amp_dtype,
            "cpu",
        )
    for where, why in skipped[:MAX_REPORTED]:
        logger.warning("skipped %s: %s", where, why)
    if len(skipped) > MAX_REPORTED:
        logger.warning("... and %d more images that did not decode", len(skipped) - MAX_REPORTED)
    return EncodedSet(features, samples, skipped)


def describe_skips(skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """The result-JSON record of the images left out: how many, and the first few."""
    return {
        "images_skipped": len(skipped),
        "skipped_examples": [f"{where}: {why}" for where, why in skipped[:MAX_REPORTED]],
    }
