"""The Accelerate training loop: objective losses, optimizer + schedule, checkpoints, resume, logs.

The loop takes any iterable of batch dicts (``image``, ``text`` and whatever fields the objective
declared) and a list of evaluators; it knows nothing about tar files or eval datasets. When the
iterable has ``state_dict``/``load_state_dict`` (the training stream does), its position is saved
in every checkpoint and restored on resume, so a resumed run sees exactly the batches an
uninterrupted one would; its ``skips`` (bad samples per shard) are written to the run directory.

This module holds the step and its schedule (log, evaluate, checkpoint, stop); the parts live
beside it: :mod:`~vlp.training.device_batches` (micro-batches on the device),
:mod:`~vlp.training.nonfinite` (skipped steps), :mod:`~vlp.training.progress` (bar, pace, ETA),
:mod:`~vlp.training.evaluation` (which ranks evaluate), :mod:`~vlp.training.run_dir` (the run's
folder, ``metrics.jsonl``), :mod:`~vlp.training.stop_signals` (preemption) and
:mod:`~vlp.training.trainer_checkpoint` (what a checkpoint holds, what a resume checks).
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from vlp.config import Config, validate_config
from vlp.distributed import NonFiniteFeaturesError, all_reduce_mean, contrastive_group
from vlp.models.vlp_model import VlpModel
from vlp.objectives import Objective, total_loss
from vlp.objectives.episodic import EpisodicObjective
from vlp.training.compile import compile_towers
from vlp.training.device_batches import DeviceBatches
from vlp.training.episodes import EpisodeDriver, episode_plan
from vlp.training.evaluation import Evaluator, run_evaluators
from vlp.training.gradcache import cached_batch_loss, replay_backward
from vlp.training.model_state import make_scalars_shardable, register_forward_methods
from vlp.training.nonfinite import NonFiniteSkips
from vlp.training.optim import EIGHT_BIT, create_optimizer, create_scheduler, names_in
from vlp.training.progress import Progress, duration
from vlp.training.run_dir import RunDir
from vlp.training.seeding import seed_rank
from vlp.training.stop_signals import StopFlag
from vlp.training.trainer_checkpoint import TrainerCheckpoints, TrainerState, write_skips
from vlp.wording import count

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or preempted) run reports back."""

    step: int
    last_losses: dict[str, float]
    interrupted: bool
    nonfinite_steps: int
    seconds: float
    eval_metrics: dict[str, float]
    stop_signal: str = ""
    """The signal that stopped the run early (``SIGTERM``, ``SIGUSR1``, ``SIGINT``), or ""."""


class Trainer:
    """Runs ``config.train.steps`` optimizer steps of ``objective`` on ``model``.

    Args:
        config: the resolved run config.
        model: the open_clip model (wrapped here into a :class:`vlp.models.VlpModel` with the
            objective's heads), or a VlpModel already built (with frozen helpers attached).
        objective: the loss and the model call (see :class:`vlp.objectives.Objective`).
        batches: this rank's batch dicts; iterated again when it ends (the next epoch);
            called once, with the step the run starts (or resumes) at.
        accelerator: the run's Accelerator (see :func:`vlp.training.accel.create_accelerator`).
        model_info: JSON metadata stored with every checkpoint (model name/config, preprocess).
        evaluators: called every ``eval.every`` steps and at the end, on the main process.
        image_transform: applied to every image view of the batch once it is on the device
            (with ``data.uint8_batches`` the stream sends uint8 pixels, normalised here: 4×
            fewer bytes between processes and to the device); None: views used as they come.
    """

    def __init__(
        self,
        config: Config,
        model: nn.Module,
        objective: Objective,
        batches: Iterable[dict[str, Any]],
        *,
        accelerator: Accelerator,
        model_info: dict[str, Any],
        evaluators: Sequence[Evaluator] = (),
        image_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        validate_config(config)
        if any(True for _ in objective.parameters()):
            raise ValueError(
                f"objective {type(objective).__name__} holds parameters; return its trainable "
                "modules from heads() so that they are optimised, wrapped and checkpointed"
            )
        if not isinstance(model, VlpModel):
            model = objective.build_model(model)
        self.config = config
        self.accelerator = accelerator
        self.objective = objective.to(accelerator.device)
        self.batches = batches
        self.evaluators = list(evaluators)
        self.image_transform = image_transform
        self.run_dir = RunDir(Path(config.train.out_dir), accelerator)
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        if self.sharded and config.optim.name in EIGHT_BIT:
            # a shard's quantisation blocks and absmax are not DTensors: no whole-state gather
            raise ValueError(
                f"optim.name={config.optim.name} does not run under FSDP (its 8-bit state is "
                "not sharded like the parameters): use DDP, or optim.name=adamw/stable_adamw"
            )
        scalars = make_scalars_shardable(model) if self.sharded else []
        if config.train.compile:
            compile_towers(model, config.train.compile_backend)
        self.global_batch = (
            config.data.batch_size * config.train.accum_steps * accelerator.num_processes
        )
        plan, image_lr_end = None, None
        if isinstance(objective, EpisodicObjective):
            plan = episode_plan(objective.episode_samples(), self.global_batch, config.train.steps)
            image_lr_end = objective.image_lr_end(plan.steps_per_episode, plan.episodes)
        apart = frozenset(() if image_lr_end is None else names_in(model, model.clip.visual))
        optimizer = create_optimizer(
            model, config.optim, objective.no_decay(model), accelerator.device, apart=apart
        )
        scheduler = create_scheduler(optimizer, config.optim, config.train.steps, image_lr_end)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(
            model, optimizer, scheduler
        )
        if self.sharded:
            register_forward_methods(accelerator.unwrap_model(self.model))
        self.objective.group = contrastive_group(config.train.group_size)
        self.objective.tile_size = config.train.tile_size
        self.episodes = None
        if isinstance(objective, EpisodicObjective) and plan is not None:
            samples = objective.episode_samples()
            if (used := plan.steps_per_episode * self.global_batch) < samples:
                logger.info(
                    "episodes of %d samples are %d steps of the global batch %d: %d samples each "
                    "(the incomplete last batch is dropped, as in the official ProtoCLIP loop)",
                    samples, plan.steps_per_episode, self.global_batch, used,
                )  # fmt: skip
            if image_lr_end is not None:
                logger.info(
                    "the image tower's lr reaches 0 at step %d (where the LiT episodes start), "
                    "the rest of the model's at step %d", image_lr_end, config.train.steps,
                )  # fmt: skip
            self.episodes = EpisodeDriver(
                objective, plan, rank=accelerator.process_index,
                world_size=accelerator.num_processes, batch_size=config.data.batch_size,
                accum_steps=config.train.accum_steps, fresh_views=objective.fresh_views(),
            )  # fmt: skip
        self.checkpoints = TrainerCheckpoints(
            accelerator, self.model, self.optimizer, self.scheduler,
            scalars=scalars, batches=batches, model_info=model_info,
            directory=self.run_dir.checkpoints, out_dir=self.run_dir.path,
            global_batch=self.global_batch, keep=config.train.keep_checkpoints,
            episodes=self.episodes, seed=config.train.seed, batch_size=config.data.batch_size,
            elastic=config.train.elastic, optimizer_name=config.optim.name,
        )  # fmt: skip
        self.nonfinite = NonFiniteSkips(
            config.train.max_nonfinite_steps, self.run_dir.checkpoints, accelerator.process_index
        )
        self.step = 0
        self._saved_step = -1
        self.run_id = uuid.uuid4().hex
        """Names this run's checkpoints (kept across resumes); pruning touches only its own."""
        # Every parameter is made (the same on every rank): from here on each rank draws its own
        # dropout and drop-path masks (vlp.training.seeding); a resume restores this rank's state.
        seed_rank(config.train.seed, accelerator.process_index)

    @property
    def nonfinite_total(self) -> int:
        """Steps skipped so far for a non-finite loss (over resumes)."""
        return self.nonfinite.total

    # ----------------------------------------------------------------------------- run

    def fit(self) -> TrainResult:
        """Train to ``train.steps`` (resuming if asked); checkpoint on schedule and on SIGTERM."""
        acc, cfg = self.accelerator, self.config
        if cfg.train.resume:
            path = self.checkpoints.resolve(cfg.train.resume)
            if path is not None:
                self.load_checkpoint(path)
        else:
            self.run_dir.claim(cfg.train.overwrite)
        self.run_dir.prepare(cfg, self.step, self.global_batch)
        logger.info(
            "training %s from step %d: %s x %s x batch %d = global batch %d (contrastive "
            "groups of %s)", count(cfg.train.steps, "step"), self.step,
            count(acc.num_processes, "process", "processes"),
            count(cfg.train.accum_steps, "micro-batch", "micro-batches"),
            cfg.data.batch_size, self.global_batch,
            count(cfg.train.group_size or acc.num_processes, "rank"),
        )  # fmt: skip
        feed = DeviceBatches(
            self.batches, cfg.train.accum_steps, acc.device,
            list(self.objective.fields().views), self.image_transform,
        )  # fmt: skip
        progress = Progress(
            cfg.train.steps, self.step, self.global_batch,
            show_bar=acc.is_local_main_process and sys.stderr.isatty(),
        )  # fmt: skip
        losses: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        interrupted = False
        with StopFlag() as stop, logging_redirect_tqdm():
            while self.step < cfg.train.steps and not interrupted:
                if self.episodes is not None and self.episodes.due():
                    interrupted = self._begin_episode(feed, stop)
                    if interrupted:
                        break
                micro_batches = feed.next(self.step)
                if self.episodes is not None:
                    self.episodes.label(micro_batches)
                parts, interrupted = self.train_step(micro_batches, stop.requested)
                if parts is not None:
                    progress.advance()
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        samples_per_s, eta_s = progress.pace(self.step)
                        losses = self._log(parts, samples_per_s, eta_s=eta_s)
                        progress.logged(losses["train/loss"])
                    if cfg.eval.every and self.step % cfg.eval.every == 0:
                        eval_metrics = self.evaluate()
                    every = cfg.train.checkpoint_every
                    if every and self.step % every == 0:
                        self.save_checkpoint()
        if self._saved_step != self.step:  # the end of the run, or SIGTERM (preemption)
            self.save_checkpoint()
        if interrupted:
            logger.warning(
                "%s: checkpoint written at step %d; stopping (resume with train.resume=latest)",
                stop.signal_name or "stop requested", self.step,
            )  # fmt: skip
        progress.close()
        if not interrupted and (not cfg.eval.every or self.step % cfg.eval.every):
            eval_metrics = self.evaluate()
        acc.end_training()
        return TrainResult(
            step=self.step,
            last_losses=losses,
            interrupted=interrupted,
            nonfinite_steps=self.nonfinite.total,
            seconds=progress.seconds(),
            eval_metrics=eval_metrics,
            stop_signal=stop.signal_name if interrupted else "",
        )

    def train_step(
        self, batch: dict[str, Any] | list[dict[str, Any]], stop_requested: bool = False
    ) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """One optimizer step on a batch (or ``train.accum_steps`` micro-batches) on the device.

        Returns the loss parts (None when the step was skipped because some rank's loss was not
        finite) and whether any rank asked to stop. The two flags travel in one all-reduce so
        that every rank takes the same branch and collectives stay paired. With several
        micro-batches the gradient is accumulated exactly (:mod:`vlp.training.gradcache`).
        """
        micro_batches = batch if isinstance(batch, list) else [batch]
        self.model.train()
        cached = None
        try:
            if len(micro_batches) == 1:
                loss, parts = self._forward(micro_batches[0])
            else:
                cached = cached_batch_loss(
                    self.model, self.objective, micro_batches,
                    autocast=self.accelerator.autocast, device=self.accelerator.device,
                )  # fmt: skip
                loss, parts = cached.loss, {**cached.parts, **cached.shared}
        except NonFiniteFeaturesError as error:  # raised on every rank of the group alike
            logger.warning("%s", error)
            loss, parts = torch.tensor(float("nan")), {}
        flags = all_reduce_mean(
            torch.tensor([float(not torch.isfinite(loss)), float(stop_requested)])
        )
        stop = bool(flags[1] > 0)
        if flags[0] > 0:
            self.nonfinite.skip(self.step + 1, parts)
            return None, stop
        if cached is None:
            self.accelerator.backward(loss)
        else:
            sample_parts = replay_backward(
                self.model, self.objective, micro_batches, cached,
                backward=self.accelerator.backward, no_sync=self.accelerator.no_sync,
                autocast=self.accelerator.autocast, device=self.accelerator.device,
            )  # fmt: skip
            parts.update(sample_parts)
            finite = all(bool(torch.isfinite(v).all()) for v in sample_parts.values())
            if sample_parts and all_reduce_mean(torch.tensor([float(not finite)]))[0] > 0:
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite.skip(self.step + 1, sample_parts)
                return None, stop
        self.nonfinite.finite()
        self._optimizer_step()
        self.step += 1
        return parts, stop

    def _begin_episode(self, feed: DeviceBatches, stop: StopFlag) -> bool:
        """Pass 1 of the episode starting now (:mod:`vlp.training.episodes`); True when a stop
        was requested during it (the stream is then back at the episode's start)."""
        assert self.episodes is not None
        values, stopped = self.episodes.pass_one(
            self.model, feed, self.step, self.accelerator.autocast, lambda: stop.requested
        )
        if values:
            self.run_dir.record(values, self.step)
            if self.accelerator.is_main_process:
                logger.info("episode at step %d: %s", self.step, " ".join(
                    f"{k.removeprefix('episode/')}={v:.4g}" for k, v in values.items()
                ))  # fmt: skip
        return stopped

    def _forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.accelerator.autocast():
            outputs = self.model(self.objective.model_inputs(batch))
            parts = self.objective(outputs, batch)
            loss = total_loss(parts)
        return loss, {**parts, **self.objective.log_values(outputs)}

    def _optimizer_step(self) -> None:
        self.objective.before_optimizer_step(self.accelerator.unwrap_model(self.model))
        if self.config.optim.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_step(self.accelerator.unwrap_model(self.model))

    # ----------------------------------------------------------------------------- logs

    def _log(
        self, parts: dict[str, torch.Tensor], samples_per_s: float, eta_s: float = 0.0
    ) -> dict[str, float]:
        values = {f"train/{k}": float(all_reduce_mean(v.float())) for k, v in parts.items()}
        values["train/loss"] = sum(v for k, v in values.items() if k.endswith("_loss"))
        values["train/lr"] = self.scheduler.get_last_lr()[0]
        values["train/samples_per_s"] = samples_per_s
        self.run_dir.record(values, self.step)
        if self.accelerator.is_main_process:
            logger.info(
                "step %d/%d %s eta=%s", self.step, self.config.train.steps,
                " ".join(f"{k}={v:.4g}" for k, v in values.items()), duration(eta_s),
            )  # fmt: skip
        return values

    def evaluate(self) -> dict[str, float]:
        """Run every evaluator on the main process while other ranks wait; under FSDP on every
        rank (each forward gathers the parameters from all), writing files on the main one."""
        acc = self.accelerator
        metrics = run_evaluators(self.evaluators, self.model, self.step, acc, self.sharded)
        if acc.is_main_process and self.evaluators:
            self.run_dir.record(metrics, self.step)
            logger.info("eval at step %d: %s", self.step, metrics)
        acc.wait_for_everyone()
        return metrics

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically, then prune this run's old ones (see
        :meth:`~vlp.training.trainer_checkpoint.TrainerCheckpoints.save`); a failed write raises
        :class:`~vlp.training.trainer_checkpoint.CheckpointWriteError`, the previous one intact."""
        final = self.checkpoints.save(TrainerState(self.step, self.nonfinite.total, self.run_id))
        self._saved_step = self.step
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, step and this rank's RNG states from ``path``."""
        state = self.checkpoints.load(path)
        self.step = self._saved_step = state.step
        self.nonfinite.total = state.nonfinite_steps
        self.run_id = state.run_id
        logger.info("resumed from %s at step %d", path, self.step)

    def write_skips(self) -> None:
        """Write this rank's bad samples skipped so far, per shard, into
        ``RUN/data_skips_rank<r>.json`` (and a warning into the log); nothing when the stream
        keeps no ``skips``. Every checkpoint refreshes the file; call this when a run stops
        between checkpoints (``launch/run.py`` does on ``TooManyBadSamples``), so the report
        names the shards that stopped it."""
        write_skips(self.batches, self.run_dir.path, self.accelerator.process_index)
