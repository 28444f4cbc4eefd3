"""Compose a training run from a config: data stream, model, objective, evaluators, Trainer.

This is where the three layers meet (vlp knows nothing of shards or eval sets). Every start-up
problem a user can fix (missing shard, unknown model/objective, missing sample fields) is raised
as :class:`StartupError` with one sentence naming the thing and what to do.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from data_pipelines.fields import missing_fields
from data_pipelines.remote import register_remote_openers
from data_pipelines.shards import split_sources
from data_pipelines.stream import TooManyBadSamples, make_train_stream
from data_pipelines.transforms import fast_transforms_for_model
from evals.dataset_evaluator import DatasetEvaluator
from evals.datasets import load_labelled_shards, open_eval_set
from evals.eval_set import EvalDataError
from evals.heldout import HeldoutEvaluator
from evals.plots import plot_loss_curve
from vlp.config import Config
from vlp.distributed import contrastive_group
from vlp.models import PretrainedError, create_model, model_config, preprocess_config
from vlp.objectives import create_objective, objective_class
from vlp.training import (
    NonFiniteLossError,
    ResumeError,
    Trainer,
    TrainResult,
    create_accelerator,
    create_trackers,
)
from vlp.training.accel import check_sharding
from vlp.training.threads import set_threads

logger = logging.getLogger("vlp")


class StartupError(RuntimeError):
    """A problem with the user's config or data found before training starts."""


class RunStopped(StartupError):
    """Training stopped on a problem a user fixes (too many bad samples, losses that stay
    non-finite); like :class:`StartupError`: one line ``vlp: error: ...``, exit status 2, and
    the same line in ``train.log``."""


def log_to_file_only(message: str) -> None:
    """Write ``message`` as an ERROR line to ``train.log`` only: on stderr the CLI prints it once,
    as ``vlp: error: ...``."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@dataclass
class RunPlan:
    """What a full run would do; printed by ``vlp train --check``."""

    world_size: int
    global_batch: int
    steps: int
    samples_seen: int
    train_shards: int
    out_dir: str
    objective: str
    model: str
    parameters: int
    first_step_loss: float | None = None


def setup_logging(out_dir: Path, is_main: bool) -> None:
    """Log to stderr and ``train.log`` on the main process; warnings only elsewhere."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING)  # libraries (open_clip logs at INFO) stay quiet
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out_dir / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)


def shard_urls(urls: str, what: str, weights: list[float] | None = None) -> list[str]:
    """Expanded shard URLs (``::`` sources), or a StartupError naming what is wrong."""
    try:
        return split_sources(urls, weights)[0]
    except FileNotFoundError as error:
        raise StartupError(f"{what} shards not found: {error}") from None
    except ValueError as error:
        raise StartupError(str(error)) from None


def check_data(config: Config, required: frozenset[str]) -> list[str]:
    """Expand the shard URLs and check that the first shard carries the objective's fields."""
    if not config.data.train_shards:
        raise StartupError("data.train_shards is empty; set it to a folder or shard pattern")
    urls = shard_urls(config.data.train_shards, "training", config.data.train_weights)
    try:
        missing = missing_fields(urls[0], required)
    except ValueError as error:
        raise StartupError(str(error)) from None
    if missing:
        raise StartupError(
            f"objective '{config.objective.name}' needs sample fields {sorted(missing)} that "
            f"shard '{urls[0]}' does not have; write them into the shards or pick another objective"
        )
    return urls


def build_model(config: Config) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """The model, its transforms and tokenizer, and the metadata stored with checkpoints."""
    try:
        model, preprocess_train, preprocess_val, tokenizer = create_model(
            config.model.name,
            config.model.pretrained,
            lock_image=config.model.lock_image,
            lock_text=config.model.lock_text,
            tokenizer=config.model.tokenizer,
            model_kwargs=objective_class(config.objective.name).model_kwargs,
        )
    except PretrainedError as error:
        raise StartupError(f"model.pretrained='{config.model.pretrained}': {error}") from None
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        raise StartupError(f"model.name='{config.model.name}': {error}") from None
    info = {
        "model_name": config.model.name,
        "model_cfg": model_config(config.model.name)
        | objective_class(config.objective.name).model_kwargs,
        "preprocess_cfg": preprocess_config(model),
    }
    return model, preprocess_train, preprocess_val, tokenizer, info


def train_transforms(
    model: Any, preprocess_train: Any
) -> tuple[Any, int | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(per-sample transform, JPEG draft size, on-device normalisation) for the train stream.

    The fast path (``data_pipelines.transforms``: uint8 crops from workers, JPEG draft decoding,
    normalisation on the device) reproduces open_clip's train preprocessing; where the model's
    preprocessing has something it does not reproduce, open_clip's own transform is used.
    """
    try:
        fast = fast_transforms_for_model(model)
    except ValueError as reason:
        logger.info("open_clip's train preprocessing in the workers (fast path: %s)", reason)
        return preprocess_train, None, None
    return fast.train, fast.draft_size, fast.normalize


def build_evaluators(
    config: Config, preprocess_val: Any, tokenizer: Any, out_dir: Path
) -> list[Callable[[Any, int], dict[str, float]]]:
    """Evaluators from the ``eval`` section: held-out labelled shards, and ``eval.datasets``."""
    evaluators: list[Callable[[Any, int], dict[str, float]]] = []
    if config.eval.zeroshot_shards:
        if not config.eval.classnames:
            raise StartupError("eval.zeroshot_shards is set but eval.classnames is empty")
        urls = shard_urls(config.eval.zeroshot_shards, "eval")
        evaluators.append(
            HeldoutEvaluator(
                "heldout",
                load_labelled_shards(urls, preprocess_val),
                config.eval.classnames,
                config.eval.templates,
                tokenizer,
                out_dir,
                model_name=config.model.name,
                batch_size=config.eval.batch_size,
            )
        )
    for name, path in config.eval.datasets.items():
        try:
            eval_set = open_eval_set(path)
        except EvalDataError as error:
            raise StartupError(f"eval.datasets.{name}: {error}") from None
        evaluators.append(
            DatasetEvaluator(
                name,
                eval_set,
                preprocess_val,
                tokenizer,
                config.eval.templates,
                out_dir,
                model_name=config.model.name,
                batch_size=config.eval.batch_size,
            )  # fmt: skip
        )
    return evaluators


def train(config: Config) -> TrainResult:
    """Run the whole training described by ``config`` (under ``accelerate launch`` or not)."""
    return _run(config, check=False)[0]


def check(config: Config) -> RunPlan:
    """Validate config and data, run ONE step in a scratch directory, and describe the run."""
    return _run(config, check=True)[1]


def _run(config: Config, *, check: bool) -> tuple[TrainResult, RunPlan]:
    try:
        objective = create_objective(config.objective.name, **config.objective.kwargs)
    except (ValueError, TypeError) as error:
        raise StartupError(f"objective: {error}") from None
    register_remote_openers(config.data.remote_timeout, config.data.remote_retries)
    urls = check_data(config, objective_class(config.objective.name).requires)
    run_config = config
    scratch = None
    if check:
        scratch = tempfile.TemporaryDirectory(prefix="vlp-check-")
        run_config = replace(
            config,
            train=replace(config.train, steps=1, out_dir=scratch.name, resume=None),
            eval=replace(config.eval, zeroshot_shards=None),
        )
    out_dir = Path(run_config.train.out_dir)
    try:
        trackers = create_trackers(config.train.report_to, out_dir)
    except ValueError as error:
        raise StartupError(str(error)) from None
    accelerator = create_accelerator(out_dir, log_with=None if check else trackers)
    setup_logging(out_dir, accelerator.is_main_process)
    try:
        check_sharding(accelerator)
    except ValueError as error:
        raise StartupError(str(error)) from None
    try:
        contrastive_group(config.train.group_size)  # made once here, reused by the trainer
    except ValueError as error:
        raise StartupError(str(error)) from None
    set_seed(config.train.seed)
    model, preprocess_train, preprocess_val, tokenizer, info = build_model(config)
    evaluators = build_evaluators(run_config, preprocess_val, tokenizer, out_dir)
    # After the start-up checks (a user error stays one line), before the stream and any step.
    set_threads(config.train.threads, config.data.workers)

    train_transform, draft_size, normalize = train_transforms(model, preprocess_train)
    batches = make_train_stream(
        config.data.train_shards,
        preprocess=train_transform,
        draft_size=draft_size,
        tokenizer=tokenizer,
        batch_size=config.data.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        workers=config.data.workers,
        seed=config.train.seed,
        resampled=config.data.resampled,
        shuffle_buffer=config.data.shuffle_buffer,
        shards_in_flight=config.data.shards_in_flight,
        weights=config.data.train_weights,
        image_keys=config.data.image_keys,
        text_key=config.data.text_key,
        caption_field=config.data.caption_field,
        prefetch_factor=config.data.prefetch_factor,
        timeout=config.data.batch_timeout,
        max_skip_fraction=config.data.max_skip_fraction,
        remote_timeout=config.data.remote_timeout,
        remote_retries=config.data.remote_retries,
    )

    trainer = Trainer(
        run_config,
        model,
        objective,
        batches,
        accelerator=accelerator,
        image_transform=normalize,
        model_info=info,
        evaluators=evaluators,
    )
    try:
        result = trainer.fit()
    except ResumeError as error:
        raise StartupError(str(error)) from None
    except TooManyBadSamples as error:
        trainer._write_skips()  # data_skips_rank<r>.json: which shards, how many, why
        message = (
            f"{error}; per-shard counts in {out_dir / 'data_skips_rank*.json'}: fix or drop "
            "those shards, or raise data.max_skip_fraction"
        )
        log_to_file_only(message)
        raise RunStopped(message) from None
    except NonFiniteLossError as error:
        log_to_file_only(str(error))
        raise RunStopped(str(error)) from None
    plan = RunPlan(
        world_size=accelerator.num_processes,
        global_batch=trainer.global_batch,
        steps=config.train.steps,
        samples_seen=trainer.global_batch * config.train.steps,
        train_shards=len(urls),
        out_dir=config.train.out_dir,
        objective=config.objective.name,
        model=config.model.name,
        parameters=sum(p.numel() for p in model.parameters()),
        first_step_loss=result.last_losses.get("train/loss"),
    )
    if scratch is not None:
        scratch.cleanup()
    elif accelerator.is_main_process:
        plot_history(out_dir)
    return result, plan


def plot_history(out_dir: Path) -> Path | None:
    """Draw ``plots/loss_curve.png`` from the run's ``metrics.jsonl`` (all resumes included)."""
    log = out_dir / "metrics.jsonl"
    if not log.is_file():
        return None
    by_step = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:  # eval records carry eval/<dataset>/<metric> keys only
            by_step[record["step"]] = record["train/loss"]
    steps = sorted(by_step)
    return plot_loss_curve(steps, [by_step[s] for s in steps], out_dir / "plots" / "loss_curve.png")
