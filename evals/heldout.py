"""Zero-shot classification and retrieval on a held-out labelled set, as a training evaluator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evals.datasets import LabelledSet
from evals.plots import plot_confusion_matrix, plot_recall_at_k
from evals.results import write_result
from evals.retrieval import encode_retrieval_set, retrieval_metrics
from evals.zeroshot import ZeroShotClassifier, classification_metrics


class HeldoutEvaluator:
    """Evaluate a model zero-shot (class prompts) and by image↔caption retrieval.

    Called as ``evaluator(model, step)``; returns ``{"eval/<name>/<metric>": value}`` and writes
    CLIP_benchmark-shaped JSON into ``out_dir/results`` and PNGs into ``out_dir/plots``.
    """

    def __init__(
        self,
        name: str,
        dataset: LabelledSet,
        classnames: Sequence[str],
        templates: Sequence[str],
        tokenizer: Callable[..., torch.Tensor],
        out_dir: str | Path,
        *,
        model_name: str = "vlp",
        batch_size: int = 256,
    ):
        if int(dataset.labels.max()) >= len(classnames):
            raise ValueError(
                f"eval set '{name}' has label {int(dataset.labels.max())} but only "
                f"{len(classnames)} class names were given"
            )
        self.name = name
        self.dataset = dataset
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.model_name = model_name
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int, *, write: bool = True) -> dict[str, float]:
        """Zero-shot and retrieval metrics of ``model`` at ``step`` (files only if ``write``)."""
        classifier = ZeroShotClassifier.from_model(
            model, self.tokenizer, self.classnames, self.templates, batch_size=self.batch_size
        )
        logits = classifier.logits(self.dataset.images)
        zeroshot = classification_metrics(logits, self.dataset.labels)
        image_features, text_features, texts_image_index = encode_retrieval_set(
            model,
            self.dataset.images,
            [[caption] for caption in self.dataset.captions],
            self.tokenizer,
            self.batch_size,
        )
        retrieval = retrieval_metrics(image_features, text_features, texts_image_index)
        if write:
            self._write(step, zeroshot, retrieval, logits)
        return {f"eval/{self.name}/{k}": v for k, v in {**zeroshot, **retrieval}.items() if v == v}

    def _write(
        self, step: int, zeroshot: dict[str, Any], retrieval: dict[str, Any], logits: torch.Tensor
    ) -> None:
        common = {"dataset": self.name, "model": self.model_name, "pretrained": f"step_{step}"}
        results, plots = self.out_dir / "results", self.out_dir / "plots"
        write_result(
            results / f"{self.name}_zeroshot_classification.json",
            task="zeroshot_classification",
            metrics=zeroshot,
            **common,
        )
        write_result(
            results / f"{self.name}_zeroshot_retrieval.json",
            task="zeroshot_retrieval",
            metrics=retrieval,
            **common,
        )
        plot_confusion_matrix(
            logits, self.dataset.labels, self.classnames, plots / f"{self.name}_confusion.png"
        )
        plot_recall_at_k(retrieval, plots / f"{self.name}_recall_at_k.png")
