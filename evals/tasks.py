"""CLIP_benchmark's tasks over an :class:`~evals.eval_set.EvalSet`, one function each.

Each encodes the dataset once (decoding failures counted, see :mod:`evals.batches`) and
returns a :class:`TaskResult`: the metrics under CLIP_benchmark's task name and keys, plus what
reports and plots need. The ``vlp eval`` commands and the benchmarks call these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from evals._model import Tokenizer
from evals.batches import EncodedSet, decode_sample, encode_eval_set
from evals.eval_set import EvalDataError, EvalSet
from evals.fewshot import few_shot_indices
from evals.linear_probe import linear_probe
from evals.plots import plot_classification, plot_recall_at_k, plot_retrieval_grid
from evals.retrieval import encode_captions, retrieval_metrics
from evals.zeroshot import Templates, ZeroShotClassifier, classification_metrics

Preprocess = Callable[[Image.Image], Tensor]


@dataclass
class EncodeOptions:
    """How to run the image tower: batch size, decoding workers, device, autocast dtype."""

    batch_size: int = 256
    workers: int = 0
    device: torch.device | str | None = None
    amp_dtype: torch.dtype | None = None

    def encode(self, model: nn.Module, eval_set: EvalSet, preprocess: Preprocess) -> EncodedSet:
        """``encode_eval_set`` with these options."""
        return encode_eval_set(
            model,
            eval_set,
            preprocess,
            batch_size=self.batch_size,
            workers=self.workers,
            device=self.device,
            amp_dtype=self.amp_dtype,
        )


@dataclass
class TaskResult:
    """A task's metrics, the number of images evaluated and left out, and plot material."""

    task: str
    metrics: dict[str, float]
    images: int
    skipped: list[tuple[str, str]]
    classnames: list[str] | None = None
    logits: Tensor | None = None
    targets: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON-ready facts written next to the metrics."""
    queries: list[tuple[str, list[tuple[Image.Image, bool]]]] | None = None
    """Retrieval: a few captions with their top images (correct or not), for the grid PNG."""

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """The result's PNG: a classification figure (see ``plot_classification``) when
        there are logits, else the recall@k curve (and ``<name>_top_images.png`` beside it)."""
        if self.logits is not None and self.targets is not None and self.classnames is not None:
            return plot_classification(self.logits, self.targets, self.classnames, path)
        if self.queries:  # retrieval: a grid of top images beside the curve
            grid = Path(path)
            plot_retrieval_grid(self.queries, grid.with_name(f"{grid.stem}_top_images.png"))
        return plot_recall_at_k(self.metrics, path)


def zeroshot_classification(
    model: nn.Module,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    eval_set: EvalSet,
    classnames: Sequence[str],
    templates: Templates,
    options: EncodeOptions | None = None,
) -> TaskResult:
    """Zero-shot accuracy (or mean average precision, multilabel) of ``model`` on ``eval_set``."""
    options = options or EncodeOptions()
    if eval_set.kind == "retrieval":
        raise EvalDataError(f"{eval_set.source} is a retrieval dataset (captions, no classes)")
    classifier = ZeroShotClassifier.from_model(
        model,
        tokenizer,
        classnames,
        templates,
        batch_size=options.batch_size,
        device=options.device,
        amp_dtype=options.amp_dtype,
    )
    encoded = options.encode(model, eval_set, preprocess)
    logits = classifier.logits_from_features(encoded.features).cpu()
    targets = encoded.targets()
    return TaskResult(
        "zeroshot_classification",
        classification_metrics(logits, targets),
        len(encoded.samples),
        encoded.skipped,
        list(classnames),
        logits,
        targets,
    )


def zeroshot_retrieval(
    model: nn.Module,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    eval_set: EvalSet,
    recall_k: Sequence[int] = (1, 5, 10),
    options: EncodeOptions | None = None,
) -> TaskResult:
    """Image-text retrieval recall@k and ranks of ``model`` on a captioned ``eval_set``."""
    options = options or EncodeOptions()
    if eval_set.kind != "retrieval":
        raise EvalDataError(
            f"{eval_set.source} is a {eval_set.kind} dataset; retrieval needs captions"
        )
    encoded = options.encode(model, eval_set, preprocess)
    text_features, index = encode_captions(
        model,
        encoded.captions(),
        tokenizer,
        options.batch_size,
        device=options.device,
        amp_dtype=options.amp_dtype,
    )
    metrics = retrieval_metrics(encoded.features, text_features, index, recall_k)
    captions = [caption for per_image in encoded.captions() for caption in per_image]
    return TaskResult(
        "zeroshot_retrieval",
        metrics,
        len(encoded.samples),
        encoded.skipped,
        extra={"captions": int(text_features.shape[0])},
        queries=_top_images(encoded, text_features, index, captions),
    )


def _top_images(
    encoded: EncodedSet,
    text_features: Tensor,
    index: Tensor,
    captions: Sequence[str],
    queries: int = 4,
    top: int = 5,
) -> list[tuple[str, list[tuple[Image.Image, bool]]]]:
    """For the first few captions: the best-scoring images, and whether each is the caption's
    own (for :func:`evals.plots.plot_retrieval_grid`)."""
    count = min(queries, len(captions))
    scores = text_features[:count].float() @ encoded.features.T
    best = scores.topk(min(top, scores.shape[1]), dim=1).indices
    return [
        (
            captions[q],
            [(decode_sample(encoded.samples[i]), i == int(index[q])) for i in best[q].tolist()],
        )
        for q in range(count)
    ]


def linear_probe_task(
    model: nn.Module,
    preprocess: Preprocess,
    train_set: EvalSet,
    test_set: EvalSet,
    *,
    fewshot_k: int | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    options: EncodeOptions | None = None,
) -> TaskResult:
    """Linear probe on frozen image features: fit on ``train_set`` (``fewshot_k`` images per
    class if given), choose the weight decay on a validation split of it, test on ``test_set``.
    """
    options = options or EncodeOptions()
    for eval_set in (train_set, test_set):
        if eval_set.kind != "classification":
            raise EvalDataError(f"{eval_set.source}: the linear probe needs single-label classes")
    train = options.encode(model, train_set, preprocess)
    test = options.encode(model, test_set, preprocess)
    features, labels = train.features, train.targets()
    if fewshot_k is not None:
        try:
            chosen = few_shot_indices(labels, fewshot_k, seed)
        except ValueError as error:
            raise EvalDataError(f"{train_set.source}: {error}") from None
        features, labels = features[chosen], labels[chosen]
    test_labels = test.targets()
    classnames = test_set.classnames or train_set.classnames
    num_classes = len(classnames) if classnames else int(max(labels.max(), test_labels.max())) + 1
    result = linear_probe(
        features,
        labels,
        test.features,
        test_labels,
        num_classes=num_classes,
        validation_fraction=validation_fraction,
        seed=seed,
    )
    metrics = {**result.metrics, "seed": seed, "fewshot_k": fewshot_k or -1}
    return TaskResult(
        "linear_probe",
        metrics,
        len(test.samples),
        train.skipped + test.skipped,
        classnames or [str(c) for c in range(num_classes)],
        result.logits,
        test_labels,
        extra={"train_images": len(labels)},
    )
