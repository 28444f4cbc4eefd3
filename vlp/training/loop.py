"""The Accelerate training loop: objective losses, AdamW + schedule, checkpoints, resume, logs.

The loop takes any iterable of batch dicts (``image``, ``text`` and whatever fields the objective
declared) and a list of evaluators; it knows nothing about tar files or eval datasets. When the
iterable has ``state_dict``/``load_state_dict`` (the training stream does), its position is saved
in every checkpoint and restored on resume, so a resumed run sees exactly the batches an
uninterrupted one would; its ``skips`` (bad samples per shard) are written to the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vlp.config import Config, validate_config
from vlp.distributed import NonFiniteFeaturesError, all_reduce_mean, contrastive_group
from vlp.objectives import Objective, total_loss
from vlp.training import checkpoint as ckpt
from vlp.training.gradcache import cached_batch_loss, replay_backward
from vlp.training.model_state import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    make_scalars_shardable,
    register_forward_methods,
)
from vlp.training.optim import (
    create_optimizer,
    create_scheduler,
    group_settings,
    keep_config_settings,
)
from vlp.training.provenance import provenance

logger = logging.getLogger(__name__)

Evaluator = Callable[..., dict[str, float]]
"""``evaluate(unwrapped_model, step) -> {"eval/<dataset>/<metric>": value}``, run on the main
process; under FSDP every rank runs it (the forward gathers parameters from all), the others as
``evaluate(model, step, write=False)``: metrics computed, no files written."""


class NonFiniteLossError(FloatingPointError):
    """More than ``train.max_nonfinite_steps`` non-finite losses in a row; names the step and
    the loss parts."""


class ResumeError(ValueError):
    """``train.resume`` names a checkpoint this run cannot continue (another world size or
    batch, another data configuration, not a checkpoint), or a fresh run was pointed at a folder
    that already holds a run's checkpoints."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)
"""Preemption notices: the loop finishes its step, writes a checkpoint and stops."""


@dataclass
class TrainResult:
    """What a finished (or preempted) run reports back."""

    step: int
    last_losses: dict[str, float]
    interrupted: bool
    nonfinite_steps: int
    seconds: float
    eval_metrics: dict[str, float]


class _StopFlag:
    """Set by SIGTERM or SIGUSR1 so the loop can write a checkpoint and leave (preemption)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no signal handling
                break
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


def _duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``: an ETA a person reads at a glance."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


class Trainer:
    """Runs ``config.train.steps`` optimizer steps of ``objective`` on ``model``.

    Args:
        config: the resolved run config.
        model: an open_clip-style model returning a dict of features.
        objective: the loss (see :class:`vlp.objectives.Objective`).
        batches: this rank's batch dicts; iterated again when it ends (the next epoch);
            called once, with the step the run starts (or resumes) at.
        accelerator: the run's Accelerator (see :func:`vlp.training.accel.create_accelerator`).
        model_info: JSON metadata stored with every checkpoint (model name/config, preprocess).
        evaluators: called every ``eval.every`` steps and at the end, on the main process.
        image_transform: applied to ``batch["image"]`` once it is on the device (the stream
            sends uint8 pixels, normalised here: 4× fewer bytes between processes).
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
        self.config = config
        self.accelerator = accelerator
        self.objective = objective.to(accelerator.device)
        self.batches = batches
        self.model_info = model_info
        self.evaluators = list(evaluators)
        self.image_transform = image_transform
        self.out_dir = Path(config.train.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        self._scalars = make_scalars_shardable(model) if self.sharded else []
        """0-dim parameters reshaped to [1] for FSDP; 0-dim again in checkpoints."""
        optimizer = create_optimizer(model, config.optim)
        scheduler = create_scheduler(optimizer, config.optim, config.train.steps)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(
            model, optimizer, scheduler
        )
        if self.sharded:
            register_forward_methods(accelerator.unwrap_model(self.model))
        self.global_batch = (
            config.data.batch_size * config.train.accum_steps * accelerator.num_processes
        )
        self.objective.group = contrastive_group(config.train.group_size)
        self.objective.tile_size = config.train.tile_size
        self.step = 0
        self.nonfinite_total = 0
        self._consecutive_nonfinite = 0
        self._saved_step = -1
        self.run_id = uuid.uuid4().hex
        """Names this run's checkpoints (kept across resumes); pruning touches only its own."""

    # ----------------------------------------------------------------------------- run

    def fit(self) -> TrainResult:
        """Train to ``train.steps`` (resuming if asked); checkpoint on schedule and on SIGTERM."""
        acc, cfg = self.accelerator, self.config
        if cfg.train.resume:
            try:
                path = ckpt.resolve_resume(cfg.train.resume, self.checkpoint_dir)
            except FileNotFoundError as error:
                raise ResumeError(str(error)) from None
            if path is None:
                logger.info("train.resume=latest: no checkpoint yet, starting from step 0")
            else:
                self.load_checkpoint(path)
        else:
            self._claim_run_dir()
        self._prepare_run_dir()
        logger.info(
            "training %d steps from step %d: %d processes x %d micro-batches x batch %d = global "
            "batch %d (contrastive groups of %s ranks)", cfg.train.steps, self.step,
            acc.num_processes, cfg.train.accum_steps, cfg.data.batch_size, self.global_batch,
            cfg.train.group_size or acc.num_processes,
        )  # fmt: skip
        if cfg.optim.warmup_steps > cfg.train.steps and acc.is_main_process:
            logger.warning(
                "optim.warmup_steps=%d is more than train.steps=%d: the learning rate never "
                "reaches optim.lr=%g; lower optim.warmup_steps",
                cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.lr,
            )  # fmt: skip
        self._iterator: Iterator[dict[str, Any]] = iter(self.batches)
        # A bar only on a terminal: piped into a file its \r frames glue onto the log lines,
        # which carry the same step, losses, samples/s and ETA.
        bar = tqdm(
            total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
            disable=not (acc.is_local_main_process and sys.stderr.isatty()),
        )  # fmt: skip
        losses: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        started, window_start, window_steps = time.time(), time.time(), 0
        first_step = self.step
        interrupted = False
        with _StopFlag() as stop, logging_redirect_tqdm():
            while self.step < cfg.train.steps and not interrupted:
                parts, interrupted = self.train_step(self._next_batch(), stop.requested)
                if parts is not None:
                    window_steps += 1
                    bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        now = time.time()
                        elapsed = max(now - window_start, 1e-9)
                        per_step = (now - started) / (self.step - first_step)
                        losses = self._log(
                            parts,
                            window_steps * self.global_batch / elapsed,
                            eta_s=per_step * (cfg.train.steps - self.step),
                        )
                        bar.set_postfix(loss=f"{losses['train/loss']:.3f}")
                        window_start, window_steps = time.time(), 0
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
        bar.close()
        if not interrupted and (not cfg.eval.every or self.step % cfg.eval.every):
            eval_metrics = self.evaluate()
        acc.end_training()
        return TrainResult(
            step=self.step,
            last_losses=losses,
            interrupted=interrupted,
            nonfinite_steps=self.nonfinite_total,
            seconds=time.time() - started,
            eval_metrics=eval_metrics,
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
            self._skip_nonfinite(parts)
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
                self._skip_nonfinite(sample_parts)
                return None, stop
        self._consecutive_nonfinite = 0
        self._optimizer_step()
        self.step += 1
        return parts, stop

    def _skip_nonfinite(self, parts: dict[str, torch.Tensor]) -> None:
        """Count a skipped step; past ``train.max_nonfinite_steps`` in a row, stop the run with
        the step being attempted and this rank's loss parts (``{}``: features were not finite)."""
        self.nonfinite_total += 1
        self._consecutive_nonfinite += 1
        losses = ", ".join(
            f"{k}={float(v.detach().float().mean()):.4g}"
            for k, v in parts.items()
            if k.endswith("_loss")
        )
        logger.warning("non-finite loss at step %d (%s); step skipped", self.step + 1, losses)
        if self._consecutive_nonfinite > self.config.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite} non-finite losses in a row at step "
                f"{self.step + 1} (losses on rank {self.accelerator.process_index}: "
                f"{losses or 'features not finite'}; train.max_nonfinite_steps="
                f"{self.config.train.max_nonfinite_steps}); the last checkpoint is in "
                f"{self.checkpoint_dir}: lower optim.lr or check the data"
            )

    def _next_batch(self) -> list[dict[str, Any]]:
        """The next ``train.accum_steps`` micro-batches, on the device (a new epoch as needed)."""
        batches = [
            _to_device(self._next_from_stream(), self.accelerator.device)
            for _ in range(self.config.train.accum_steps)
        ]
        if self.image_transform is not None:
            for batch in batches:
                batch["image"] = self.image_transform(batch["image"])
        return batches

    def _next_from_stream(self) -> dict[str, Any]:
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.batches)
        try:
            return next(self._iterator)
        except StopIteration:
            raise RuntimeError(
                f"the training stream is empty at step {self.step} (a new epoch gave no batch)"
            ) from None

    def _forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.accelerator.autocast():
            outputs = self.model(image=batch["image"], text=batch["text"])
            parts = self.objective(outputs, batch)
            loss = total_loss(parts)
        parts = {**parts, "logit_scale": outputs["logit_scale"].detach()}
        return loss, parts

    def _optimizer_step(self) -> None:
        if self.config.optim.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP: s = exp(t) <= 100, clamped after the optimizer step
            self.accelerator.unwrap_model(self.model).logit_scale.clamp_(0, math.log(100))

    # ----------------------------------------------------------------------------- logs

    def _claim_run_dir(self) -> None:
        """A fresh run (no ``train.resume``) refuses a folder that holds checkpoints, unless
        ``train.overwrite`` is set: then the old run's checkpoints and metrics go first."""
        existing = ckpt.list_checkpoints(self.checkpoint_dir)
        if existing and not self.config.train.overwrite:
            raise ResumeError(
                f"train.out_dir='{self.out_dir}' already holds a run (checkpoint "
                f"{existing[-1].name}); continue it with train.resume=latest, pick a new "
                "train.out_dir, or replace it with train.overwrite=true"
            )
        acc = self.accelerator
        acc.wait_for_everyone()  # every rank has looked before the main process deletes
        if existing and acc.is_main_process:
            logger.warning("train.overwrite=true: removing the run in %s", self.out_dir)
            for sub in ("checkpoints", "results", "plots"):
                shutil.rmtree(self.out_dir / sub, ignore_errors=True)
            for stale in (self.out_dir / "metrics.jsonl", *self.out_dir.glob("data_skips_*")):
                stale.unlink(missing_ok=True)
        acc.wait_for_everyone()

    def _prepare_run_dir(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            for sub in ("checkpoints", "results", "plots"):
                (self.out_dir / sub).mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
            self.config.save(self.out_dir / "config.yaml")
            if self.step == 0:  # a fresh run: no loss history of an earlier run in this dir
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            ckpt.write_json(self.out_dir / "provenance.json", provenance(acc, self.global_batch))
        acc.wait_for_everyone()
        acc.init_trackers("vlp")  # the trackers made by create_trackers (none for a check)

    def _log(
        self, parts: dict[str, torch.Tensor], samples_per_s: float, eta_s: float = 0.0
    ) -> dict[str, float]:
        values = {f"train/{k}": float(all_reduce_mean(v.float())) for k, v in parts.items()}
        values["train/loss"] = sum(v for k, v in values.items() if k.endswith("_loss"))
        values["train/lr"] = self.scheduler.get_last_lr()[0]
        values["train/samples_per_s"] = samples_per_s
        self._record(values)
        if self.accelerator.is_main_process:
            logger.info(
                "step %d/%d %s eta=%s", self.step, self.config.train.steps,
                " ".join(f"{k}={v:.4g}" for k, v in values.items()), _duration(eta_s),
            )  # fmt: skip
        return values

    def _record(self, values: dict[str, float]) -> None:
        """Send ``values`` to the trackers and append them to ``metrics.jsonl`` (main process)."""
        self.accelerator.log(values, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **values}) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Run every evaluator on the main process while other ranks wait; under FSDP on every
        rank (each forward gathers the parameters from all), writing files on the main one."""
        metrics: dict[str, float] = {}
        main = self.accelerator.is_main_process
        if (main or self.sharded) and self.evaluators:
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            for evaluate in self.evaluators:
                metrics.update(
                    evaluate(model, self.step) if main else evaluate(model, self.step, write=False)
                )
            model.train(was_training)
            if main:
                self._record(metrics)
                logger.info("eval at step %d: %s", self.step, metrics)
        self.accelerator.wait_for_everyone()
        return metrics

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically and durably, then prune this run's old ones.

        The files go into a temporary directory, closed by a ``COMPLETE`` marker, synced to disk
        and renamed (:func:`vlp.training.checkpoint.publish`). A failed write (disk full) raises
        :class:`CheckpointWriteError` naming the checkpoint; the previous checkpoint is untouched.
        """
        name = ckpt.checkpoint_name(self.step)
        tmp = self.checkpoint_dir / f"{ckpt.TMP_PREFIX}{name}"
        final = self.checkpoint_dir / name
        try:
            self._write_checkpoint(tmp, final)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            previous = [p for p in ckpt.list_checkpoints(self.checkpoint_dir) if p != final]
            kept = f"{previous[-1]} is intact" if previous else "there is no earlier checkpoint"
            raise CheckpointWriteError(
                error.errno,
                f"could not write checkpoint {final}: {error.strerror or error}; {kept}. "
                "Free disk space (or fix permissions) and resume with train.resume=latest",
            ) from error
        self._saved_step = self.step
        return final

    def _write_checkpoint(self, tmp: Path, final: Path) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.save_state_parts(tmp, f"rng_rank{acc.process_index}", ckpt.rng_state())
        if hasattr(self.batches, "state_dict"):
            ckpt.write_json(tmp / f"data_rank{acc.process_index}.json", self.batches.state_dict())
        self._write_skips()
        model_state = full_model_state(self.model, self._scalars)  # collectives: every rank
        optimizer_state = full_optimizer_state(self.model, self.optimizer, self._scalars)
        if acc.is_main_process:
            save_file(model_state, str(tmp / "model.safetensors"))
            ckpt.save_state_parts(tmp, "optimizer", optimizer_state)
            ckpt.write_json(tmp / "model_config.json", self.model_info)
            ckpt.write_json(
                tmp / "trainer_state.json",
                {
                    "step": self.step,
                    "scheduler": self.scheduler.state_dict(),
                    "world_size": acc.num_processes,
                    "global_batch": self.global_batch,
                    "samples_seen": self.step * self.global_batch,
                    "nonfinite_steps": self.nonfinite_total,
                    "run_id": self.run_id,
                },
            )
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish(tmp, final)
            ckpt.prune_checkpoints(
                self.checkpoint_dir, self.config.train.keep_checkpoints, self.run_id, self.step
            )
            logger.info("checkpoint written: %s", final)
        acc.wait_for_everyone()

    def _write_skips(self) -> None:
        """Bad samples skipped so far, per shard, into ``data_skips_rank<r>.json`` (and the log)."""
        skips = getattr(self.batches, "skips", None)
        if skips is None:
            return
        counts = skips.to_json()
        ckpt.write_json(
            self.out_dir / f"data_skips_rank{self.accelerator.process_index}.json", counts
        )
        if counts["skipped"]:
            logger.warning(
                "rank %d skipped %d bad samples so far (%d used), in %d shards; see %s",
                self.accelerator.process_index, counts["skipped"], counts["ok"],
                len(counts["by_shard"]), self.out_dir / "data_skips_rank*.json",
            )  # fmt: skip

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, step and this rank's RNG states from ``path``."""
        acc = self.accelerator
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != acc.num_processes:
            raise ResumeError(
                f"train.resume: checkpoint {path} was written by {state['world_size']} processes; "
                f"this run has {acc.num_processes}. Resume with the same number of processes."
            )
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ResumeError(
                f"train.resume: checkpoint {path} was written with global batch "
                f"{state['global_batch']}; this run has {self.global_batch} (data.batch_size x "
                "train.accum_steps x processes). Resume with the same data.batch_size and "
                "train.accum_steps, or start a new train.out_dir."
            )
        model_state = load_file(str(path / "model.safetensors"))
        load_full_model_state(self.model, model_state, self._scalars)
        settings = group_settings(self.optimizer)  # the config's; the checkpoint keeps moments
        optimizer_state = ckpt.load_state_parts(path, "optimizer")
        load_full_optimizer_state(self.model, self.optimizer, optimizer_state, self._scalars)
        # The schedule's shape (warmup, total steps) follows the CURRENT config, so a resume with
        # a larger train.steps stretches the cosine instead of sitting at lr 0 past the old end.
        scheduler_state = state["scheduler"]
        scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("lr_lambdas", [None]))
        self.scheduler.load_state_dict(scheduler_state)
        keep_config_settings(self.optimizer, self.scheduler, settings)
        ckpt.set_rng_state(ckpt.load_state_parts(path, f"rng_rank{acc.process_index}"))
        data_state = path / f"data_rank{acc.process_index}.json"
        if hasattr(self.batches, "load_state_dict"):
            if not data_state.is_file():
                raise ResumeError(f"checkpoint {path} has no data position ({data_state.name})")
            try:
                self.batches.load_state_dict(json.loads(data_state.read_text()))
            except ValueError as error:
                raise ResumeError(f"train.resume: checkpoint {path}: {error}") from None
        self.step = self._saved_step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_steps"])
        self.run_id = str(state.get("run_id", ""))  # "": a checkpoint from before run ids
        logger.info("resumed from %s at step %d", path, self.step)
