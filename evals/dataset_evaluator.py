"""A CLIP_benchmark task on one evaluation dataset, run inside training every ``eval.every`` steps.

The dataset is anything ``vlp eval`` reads (a CLIP_benchmark webdataset root, a folder of class
subfolders, a CSV table): classification sets are evaluated zero-shot, captioned sets by
retrieval, with the same task functions as the commands, so the logged numbers are the ones
``vlp eval`` would print for that checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from evals._model import Tokenizer, model_device
from evals.eval_set import EvalSet
from evals.results import write_result
from evals.tasks import EncodeOptions, Preprocess, zeroshot_classification, zeroshot_retrieval


class DatasetEvaluator:
    """Called as ``evaluator(model, step)``; returns ``{"eval/<name>/<metric>": value}``, and
    writes CLIP_benchmark-shaped JSON into ``out_dir/results`` and a PNG into ``out_dir/plots``.

    ``templates`` apply where the dataset has none of its own.
    """

    def __init__(
        self,
        name: str,
        eval_set: EvalSet,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        templates: Sequence[str],
        out_dir: str | Path,
        *,
        model_name: str = "vlp",
        batch_size: int = 256,
    ):
        self.name, self.eval_set = name, eval_set
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.templates = list(eval_set.templates or templates)
        self.out_dir = Path(out_dir)
        self.model_name, self.batch_size = model_name, batch_size

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int, *, write: bool = True) -> dict[str, float]:
        """The task's metrics for ``model`` at ``step`` (files only if ``write``)."""
        options = EncodeOptions(batch_size=self.batch_size, device=model_device(model))
        if self.eval_set.kind == "retrieval":
            result = zeroshot_retrieval(
                model, self.preprocess, self.tokenizer, self.eval_set, options=options
            )
        else:
            result = zeroshot_classification(
                model, self.preprocess, self.tokenizer, self.eval_set,
                self.eval_set.classnames or [], self.templates, options,
            )  # fmt: skip
        if write:
            write_result(
                self.out_dir / "results" / f"{self.name}_{result.task}.json",
                task=result.task,
                metrics=result.metrics,
                dataset=self.name,
                model=self.model_name,
                pretrained=f"step_{step}",
            )
            result.plot(self.out_dir / "plots" / f"{self.name}_{result.task}.png")
        return {f"eval/{self.name}/{k}": v for k, v in result.metrics.items() if v == v}
