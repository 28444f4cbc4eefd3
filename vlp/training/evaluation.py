"""Evaluation inside a training run: which ranks run the evaluators, with the model in eval mode.

Evaluators are plain callables built by the launcher (zero-shot, retrieval, held-out loss); the
trainer only decides where they run. Unsharded, the main process holds the whole model and the
other ranks just wait; under FSDP each forward gathers parameters from every rank, so all of them
must run the same evaluators, and only the main one writes files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from accelerate import Accelerator
from torch import nn

Evaluator = Callable[..., dict[str, float]]
"""``evaluate(unwrapped_model, step) -> {"eval/<dataset>/<metric>": value}``, run on the main
process; under FSDP every rank runs it (the forward gathers parameters from all), the others as
``evaluate(model, step, write=False)``: metrics computed, no files written."""


def run_evaluators(
    evaluators: Sequence[Evaluator],
    model: nn.Module,
    step: int,
    accelerator: Accelerator,
    sharded: bool,
) -> dict[str, float]:
    """Every evaluator's metrics at ``step`` on the ranks that must run them (``{}`` elsewhere);
    the model is in eval mode meanwhile and back in its former mode after."""
    metrics: dict[str, float] = {}
    main = accelerator.is_main_process
    if (main or sharded) and evaluators:
        unwrapped = accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        for evaluate in evaluators:
            metrics.update(
                evaluate(unwrapped, step) if main else evaluate(unwrapped, step, write=False)
            )
        unwrapped.train(was_training)
    return metrics
