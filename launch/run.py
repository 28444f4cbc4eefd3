"""Run training from a config: the parts from :mod:`launch.build`, then the Trainer.

Every start-up problem a user can fix (missing shard, unknown model/objective, missing sample
fields) is raised as :class:`StartupError` with one sentence naming the thing and what to do;
a run stopped by its data or its losses as :class:`RunStopped`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from data_pipelines.remote import RemoteShardError, register_remote_openers
from data_pipelines.stream import BatchTimeout, DataWorkerDied, TooManyBadSamples
from launch.build import (
    StartupError,
    batch_fields,
    build_evaluators,
    build_model,
    build_objective,
    build_stream,
)
from launch.elastic import resume_layout
from launch.sidecar_checks import check_data
from vlp.config import Config, redact_url
from vlp.distributed import contrastive_group
from vlp.objectives import Objective
from vlp.run_folder import checkpoints_dir, list_checkpoints
from vlp.training import (
    NonFiniteLossError,
    ResumeError,
    Trainer,
    TrainResult,
    create_accelerator,
    create_trackers,
)
from vlp.training.accel import check_sharding
from vlp.training.run_dir import LOCK_NAME, RunFolderInUse, hold_run_folder
from vlp.training.threads import set_threads

logger = logging.getLogger("vlp")


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


@contextlib.contextmanager
def run_logging(out_dir: Path, is_main: bool) -> Iterator[None]:
    """Log to stderr and ``train.log`` on the main process, warnings only elsewhere, while the
    run lasts; then take those handlers and levels away again, so that a process that trains
    twice (a notebook, the tests) neither doubles its lines nor writes to a stream it closed."""
    root = logging.getLogger()
    levels = root.level, logger.level
    root.setLevel(logging.WARNING)  # libraries (open_clip logs at INFO) stay quiet
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(levels[0])
        logger.setLevel(levels[1])


def train(config: Config) -> TrainResult:
    """Run the whole training described by ``config`` (under ``accelerate launch`` or not)."""
    return _run(config, check=False)[0]


def check(config: Config) -> RunPlan:
    """Validate config and data, run ONE step in a scratch directory, and describe the run."""
    return _run(config, check=True)[1]


def _run(config: Config, *, check: bool) -> tuple[TrainResult, RunPlan]:
    objective = build_objective(config)
    register_remote_openers(config.data.remote_timeout, config.data.remote_retries)
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
    # The main process by torchrun's RANK: the Accelerator that says so is made later (with
    # the settings only it knows).
    main = not check and os.environ.get("RANK", "0") == "0"
    before = set(os.listdir(out_dir)) if main and out_dir.is_dir() else None
    owned = False  # this run holds the folder (another live run's files are never touched)
    try:
        with contextlib.ExitStack() as held:
            if main:  # before anything is written there
                try:
                    held.enter_context(hold_run_folder(out_dir))
                except RunFolderInUse as error:
                    raise StartupError(str(error)) from None
                owned = True
            try:
                trackers = create_trackers(config.train.report_to, out_dir)
            except ValueError as error:
                raise StartupError(str(error)) from None
            accelerator = create_accelerator(out_dir, log_with=None if check else trackers)
            held.enter_context(run_logging(out_dir, accelerator.is_main_process))
            return _run_logged(config, run_config, objective, accelerator, scratch, check=check)
    except BaseException:
        if owned:
            _leave_as_found(out_dir, before)
        raise


def _leave_as_found(out_dir: Path, before: set[str] | None) -> None:
    """After a run that stopped before writing anything of its own (a start-up error): take
    away the ``train.log`` and lock it made, and the folder if it made that too, so that the
    folder is as the user left it. A run that wrote anything else keeps everything."""
    made = set(os.listdir(out_dir)) - (before or set()) if out_dir.is_dir() else set()
    if not made <= {LOCK_NAME, "train.log"}:
        return
    for name in made:
        (out_dir / name).unlink()
    if before is None and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _run_logged(
    config: Config,
    run_config: Config,
    objective: Objective,
    accelerator: Accelerator,
    scratch: tempfile.TemporaryDirectory | None,
    *,
    check: bool,
) -> tuple[TrainResult, RunPlan]:
    out_dir = Path(run_config.train.out_dir)
    if scratch is None:  # a real run (a check never resumes)
        config = run_config = resume_layout(config, accelerator.num_processes)
    try:
        check_sharding(accelerator)
        contrastive_group(config.train.group_size)  # made once here, reused by the trainer
    except ValueError as error:
        raise StartupError(str(error)) from None
    # The same seed on every rank, so every rank builds the same initial weights; the Trainer
    # reseeds each rank from (seed, rank) once the model and its heads are built
    # (vlp.training.seeding), so dropout masks differ between ranks.
    set_seed(config.train.seed)
    model, preprocess_train, preprocess_val, tokenizer, info = build_model(config)
    objective.use_tokenizer(tokenizer)
    parts = batch_fields(
        config, objective.fields(), model, preprocess_train, tokenizer, accelerator.device
    )
    urls = check_data(
        config, parts.fields, objective.sidecar_commands, accelerator,
        field_hint=objective.field_hint, tokenized_sidecars=objective.tokenized_sidecars,
        tokenizer=tokenizer,
    )  # fmt: skip
    evaluators = build_evaluators(run_config, preprocess_val, tokenizer, out_dir)
    if evaluators and not objective.evaluations:
        logger.info(
            "objective.name=%s trains no image-text towers: eval.* is not run (it would score "
            "untrained, frozen towers); its training loss is its measure",
            config.objective.name,
        )
        evaluators = []
    # After the start-up checks (a user error stays one line), before the stream and any step.
    set_threads(config.train.threads)
    batches = build_stream(config, parts, accelerator.process_index, accelerator.num_processes)
    if config.optim.warmup_steps > config.train.steps and accelerator.is_main_process:
        # The user's schedule (config), not the one step of `vlp train --check` (run_config).
        logger.warning(
            "optim.warmup_steps=%d is more than train.steps=%d: the learning rate never "
            "reaches optim.lr=%g; lower optim.warmup_steps",
            config.optim.warmup_steps, config.train.steps, config.optim.lr,
        )  # fmt: skip

    try:
        trainer = Trainer(
            run_config,
            model,
            objective,
            batches,
            accelerator=accelerator,
            image_transform=parts.normalize,
            model_info=info,
            evaluators=evaluators,
        )
    except ValueError as error:  # the objective cannot build on this model
        raise StartupError(f"objective.{config.objective.name}: {error}") from None
    try:
        result = trainer.fit()
    except ResumeError as error:
        raise StartupError(str(error)) from None
    except TooManyBadSamples as error:
        trainer.write_skips()  # data_skips_rank<r>.json: which shards, how many, why
        message = (
            f"{_last_line(error)}; per-shard counts in {out_dir / 'data_skips_rank*.json'}: fix or drop "
            "those shards, or raise data.max_skip_fraction"
        )
        log_to_file_only(message)
        raise RunStopped(message) from None
    except NonFiniteLossError as error:
        log_to_file_only(str(error))
        raise RunStopped(str(error)) from None
    except (RemoteShardError, DataWorkerDied, BatchTimeout) as error:
        message = redact_url(_last_line(error))
        log_to_file_only(message)
        raise RunStopped(message) from None
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
        if not result.interrupted:
            logger.info(closing_line(result, trainer.global_batch, out_dir))
    return result, plan


def closing_line(result: TrainResult, global_batch: int, out_dir: Path) -> str:
    """What a finished run says last: steps, samples, time, and where its files are."""
    checkpoints = list_checkpoints(checkpoints_dir(out_dir))
    saved = f"last checkpoint {checkpoints[-1]}" if checkpoints else "no checkpoint kept"
    results = f", eval results in {out_dir / 'results'}" if result.eval_metrics else ""
    return (
        f"finished at step {result.step:,}: {result.step * global_batch:,} samples seen, "
        f"{result.seconds / 60:.1f} min in this run; {saved}; metrics in "
        f"{out_dir / 'metrics.jsonl'}, plots in {out_dir / 'plots'}{results}"
    )


def _last_line(error: BaseException) -> str:
    """The error's own message: from a data worker, the DataLoader re-raises it with the
    worker's traceback in the message, whose last line is the error itself."""
    return str(error).strip().splitlines()[-1]


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
    from evals.plots import plot_loss_curve  # matplotlib: a second per rank at start-up

    return plot_loss_curve(steps, [by_step[s] for s in steps], out_dir / "plots" / "loss_curve.png")
