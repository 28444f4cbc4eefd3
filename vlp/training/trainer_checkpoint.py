"""What a training run puts into a checkpoint, and what a resume checks before it continues.

The directory format (temporary name, ``COMPLETE`` marker, fsync, rename, pruning) lives in
:mod:`vlp.training.checkpoint`, its read side (names, listing, ``latest``) in
:mod:`vlp.run_folder`; this module fills it: the model (open_clip's weights in
``model.safetensors``, the objective's heads beside them), the optimizer moments (those of
another ``optim.name`` are converted on resume), the schedule, every rank's RNG states and data
position, the run's counters, and an episodic objective's episode state (``episode.safetensors``,
:mod:`vlp.training.episodes`). A resume refuses a
checkpoint written with another world size or global batch, since the data order would differ
from an uninterrupted run's. The skip report of the data stream is refreshed with every checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import nn

from vlp import run_folder
from vlp.models.vlp_model import HEADS_FILE, join_clip_and_heads, split_clip_and_heads
from vlp.training import checkpoint as ckpt
from vlp.training.episodes import EpisodeDriver
from vlp.training.model_state import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
)
from vlp.training.optim import convert_optimizer_state, group_settings, keep_config_settings
from vlp.training.seeding import derive_step_seed, seed_rank

logger = logging.getLogger(__name__)

EPISODE_FILE = "episode.safetensors"


class ResumeError(ValueError):
    """``train.resume`` names a checkpoint this run cannot continue (another world size or
    batch, another data configuration, not a checkpoint), or a fresh run was pointed at a folder
    that already holds a run's checkpoints."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


@dataclass(frozen=True)
class TrainerState:
    """The run's counters, stored in ``trainer_state.json`` next to the schedule."""

    step: int
    nonfinite_steps: int
    run_id: str
    """Names the run's checkpoints (kept across resumes); pruning touches only its own."""


def _attempt(write: Callable[[], object]) -> OSError | None:
    """Run ``write``; the OSError it raised (disk full, permissions), or None."""
    try:
        write()
    except OSError as error:
        return error
    return None


def _fresh_directory(path: Path) -> None:
    """An empty ``path`` (a stale one from an interrupted save is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def write_skips(batches: Iterable[Any], out_dir: Path, rank: int) -> None:
    """Bad samples ``batches`` skipped so far, per shard, into ``data_skips_rank<r>.json`` (and
    the log); nothing when the stream keeps no ``skips``."""
    skips = getattr(batches, "skips", None)
    if skips is None:
        return
    counts = skips.to_json()
    ckpt.write_json(out_dir / f"data_skips_rank{rank}.json", counts)
    if counts["skipped"]:
        logger.warning(
            "rank %d skipped %d bad samples so far (%d used), in %d shards; see %s",
            rank, counts["skipped"], counts["ok"], len(counts["by_shard"]),
            out_dir / "data_skips_rank*.json",
        )  # fmt: skip


class TrainerCheckpoints:
    """Writes and reads ``checkpoints/step_N`` for a Trainer's prepared parts.

    Args:
        accelerator: the run's Accelerator; saving and loading are collective (every rank).
        model, optimizer, scheduler: as returned by ``accelerator.prepare``.
        scalars: 0-dim parameters reshaped for FSDP (0-dim again in the checkpoint).
        batches: the training stream; its ``state_dict`` (if any) is the data position.
        model_info: JSON metadata stored with every checkpoint (model name/config, preprocess).
        directory: where the checkpoints go (``<train.out_dir>/checkpoints``).
        out_dir: the run directory (``train.out_dir``), where the skip report goes.
        global_batch: samples per optimizer step over all ranks; a resume must match it.
        keep: ``train.keep_checkpoints``, the newest of this run to keep.
        episodes: an episodic objective's driver, whose state is saved and restored.
        seed, batch_size, elastic: ``train.seed``, ``data.batch_size`` and ``train.elastic``,
            for a resume on another number of processes or global batch (``launch.elastic``).
        optimizer_name: ``optim.name``, recorded; a checkpoint of another one is converted.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        scalars: list[str],
        batches: Iterable[dict[str, Any]],
        model_info: dict[str, Any],
        directory: Path,
        out_dir: Path,
        global_batch: int,
        keep: int,
        episodes: EpisodeDriver | None = None,
        seed: int = 0,
        batch_size: int = 1,
        elastic: str = "keep",
        optimizer_name: str = "adamw",
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scalars = scalars
        self.batches = batches
        self.model_info = model_info
        self.directory = directory
        self.out_dir = out_dir
        self.global_batch = global_batch
        self.keep = keep
        self.episodes = episodes
        self.seed, self.batch_size, self.elastic = seed, batch_size, elastic
        self.optimizer_name = optimizer_name

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint ``train.resume`` names (a path, or ``latest``); None when ``latest``
        finds none yet (the run starts from step 0). Raises :class:`ResumeError` for a path that
        is not a complete checkpoint."""
        try:
            path = run_folder.resolve_resume(resume, self.directory)
        except FileNotFoundError as error:
            raise ResumeError(str(error)) from None
        if path is None:
            logger.info("train.resume=latest: no checkpoint yet, starting from step 0")
        return path

    def save(self, state: TrainerState) -> Path:
        """Write ``checkpoints/step_N`` atomically and durably, then prune this run's old ones.

        The files go into a temporary directory, closed by a ``COMPLETE`` marker, synced to disk
        and renamed (:func:`vlp.training.checkpoint.publish`). A failed write (disk full) raises
        :class:`CheckpointWriteError` naming the checkpoint; the previous checkpoint is untouched.
        """
        name = run_folder.checkpoint_name(state.step)
        tmp = self.directory / f"{ckpt.TMP_PREFIX}{name}"
        final = self.directory / name
        try:
            self._write(tmp, final, state)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            previous = [p for p in run_folder.list_checkpoints(self.directory) if p != final]
            kept = f"{previous[-1]} is intact" if previous else "there is no earlier checkpoint"
            raise CheckpointWriteError(
                error.errno,
                f"could not write checkpoint {final}: {error.strerror or error}; {kept}. "
                "Free disk space (or fix permissions) and resume with train.resume=latest",
            ) from error
        return final

    def _write(self, tmp: Path, final: Path, state: TrainerState) -> None:
        """Every rank writes its part; a failure on any rank is raised on every rank at the next
        agreement point (instead of a barrier), so that no rank waits for one that gave up."""
        acc = self.accelerator
        failure: OSError | None = None
        if acc.is_main_process:
            failure = _attempt(lambda: _fresh_directory(tmp))
        self._agree(failure)
        failure = _attempt(lambda: self._write_rank_files(tmp))
        model_state = full_model_state(self.model, self.scalars)  # collectives: every rank
        optimizer_state = full_optimizer_state(self.model, self.optimizer, self.scalars)
        if acc.is_main_process and failure is None:
            failure = _attempt(
                lambda: self._write_main_files(tmp, state, model_state, optimizer_state)
            )
        self._agree(failure)
        if acc.is_main_process:
            failure = _attempt(lambda: ckpt.publish(tmp, final))
            if failure is None:
                ckpt.prune_checkpoints(self.directory, self.keep, state.run_id, state.step)
                logger.info("checkpoint written: %s", final)
        self._agree(failure)

    def _write_rank_files(self, tmp: Path) -> None:
        """This rank's RNG states, data position and skip report."""
        rank = self.accelerator.process_index
        ckpt.save_state_parts(tmp, f"rng_rank{rank}", ckpt.rng_state())
        if hasattr(self.batches, "state_dict"):
            ckpt.write_json(tmp / f"data_rank{rank}.json", self.batches.state_dict())
        write_skips(self.batches, self.out_dir, rank)

    def _write_main_files(
        self, tmp: Path, state: TrainerState, model_state: dict, optimizer_state: dict
    ) -> None:
        """The parts written once: weights, heads, optimizer, episode, metadata, counters."""
        clip_state, heads_state = split_clip_and_heads(model_state)
        save_file(clip_state, str(tmp / "model.safetensors"))  # what open_clip loads
        if heads_state:
            save_file(heads_state, str(tmp / HEADS_FILE))
        ckpt.save_state_parts(tmp, "optimizer", optimizer_state)
        if self.episodes is not None:
            # cloned: the state may hold one tensor under two names (safetensors refuses)
            episode = {k: v.detach().cpu().clone() for k, v in self.episodes.state().items()}
            save_file(episode, str(tmp / EPISODE_FILE))
        ckpt.write_json(tmp / "model_config.json", self.model_info)
        ckpt.write_json(
            tmp / run_folder.TRAINER_STATE,
            {
                "step": state.step,
                "scheduler": self.scheduler.state_dict(),
                "world_size": self.accelerator.num_processes,
                "global_batch": self.global_batch,
                "samples_seen": state.step * self.global_batch,
                "nonfinite_steps": state.nonfinite_steps,
                "run_id": state.run_id,
                "optimizer": self.optimizer_name,
            },
        )

    def _agree(self, failure: OSError | None) -> None:
        """A barrier that also carries each rank's write failure: raise the first rank's on
        every rank (named by rank when there are several), or return when none failed."""
        acc = self.accelerator
        if acc.num_processes == 1:
            if failure is not None:
                raise failure
            return
        mine = None if failure is None else (failure.errno, failure.strerror or str(failure))
        outcomes = gather_object([mine])
        for rank, outcome in enumerate(outcomes):
            if outcome is not None:
                errno, reason = outcome
                raise OSError(errno, f"{reason} (on rank {rank})")

    def load(self, path: Path) -> TrainerState:
        """Restore model, optimizer, scheduler, this rank's RNG states and data position from
        ``path``; return the run's counters. Raises :class:`ResumeError` when this run cannot
        continue the checkpoint."""
        acc = self.accelerator
        state = json.loads((path / run_folder.TRAINER_STATE).read_text())
        saved_processes = int(state["world_size"])
        moved = saved_processes != acc.num_processes
        if moved and "global_batch" not in state:
            raise ResumeError(
                f"train.resume: checkpoint {path} was written by {saved_processes} processes; "
                f"this run has {acc.num_processes}. Resume with the same number of processes."
            )
        rescaled = state.get("global_batch", self.global_batch) != self.global_batch
        if rescaled and (self.elastic != "rescale_lr" or self.episodes is not None):
            refusal = (
                "; an episodic objective (ProtoCLIP) cannot change it"
                if self.episodes is not None
                else "; or change it with train.elastic=rescale_lr (lr scaled by new / old)"
            )
            raise ResumeError(
                f"train.resume: checkpoint {path} was written with global batch "
                f"{state['global_batch']}; this run has {self.global_batch} (data.batch_size x "
                "train.accum_steps x processes). Resume with the same data.batch_size and "
                f"train.accum_steps, or start a new train.out_dir{refusal}."
            )
        heads_file = path / HEADS_FILE
        heads_state = load_file(str(heads_file)) if heads_file.is_file() else {}
        model_state = join_clip_and_heads(load_file(str(path / "model.safetensors")), heads_state)
        try:
            load_full_model_state(self.model, model_state, self.scalars)
        except ValueError as error:  # a head saved in a layout it no longer has (its message)
            raise ResumeError(f"train.resume: checkpoint {path}: {error}") from None
        settings = group_settings(self.optimizer)  # the config's; the checkpoint keeps moments
        optimizer_state = convert_optimizer_state(
            ckpt.load_state_parts(path, "optimizer"), self.optimizer,
            saved=str(state.get("optimizer", "adamw")), wanted=self.optimizer_name,
        )  # fmt: skip
        saved_groups = len(optimizer_state.get("param_groups", []))
        if saved_groups != len(self.optimizer.param_groups):
            raise ResumeError(
                f"train.resume: checkpoint {path} has {saved_groups} optimizer parameter groups, "
                f"this run {len(self.optimizer.param_groups)}: a tower on an lr schedule of its "
                "own has groups of its own (objective.protoclip.image_lr_end=lit; a checkpoint "
                "written before that setting resumes with image_lr_end=end)"
            )
        try:
            load_full_optimizer_state(self.model, self.optimizer, optimizer_state, self.scalars)
        except ValueError as error:  # a parameter without state that was stepped (its message)
            raise ResumeError(f"train.resume: checkpoint {path}: {error}") from None
        # The schedule's shape (warmup, total steps) follows the CURRENT config, so a resume with
        # a larger train.steps stretches the cosine instead of sitting at lr 0 past the old end.
        scheduler_state = state["scheduler"]
        scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("lr_lambdas", [None]))
        self.scheduler.load_state_dict(scheduler_state)
        keep_config_settings(self.optimizer, self.scheduler, settings)
        if moved:  # ranks are other processes now: each draws anew from (seed, step, rank)
            seed_rank(derive_step_seed(self.seed, int(state["step"])), acc.process_index)
        else:
            ckpt.set_rng_state(ckpt.load_state_parts(path, f"rng_rank{acc.process_index}"))
        if rescaled and hasattr(self.batches, "redraw"):
            try:  # no continuation at another global batch: the stream is drawn afresh
                self.batches.redraw(int(state["step"]))
            except ValueError as error:
                raise ResumeError(f"train.resume: checkpoint {path}: {error}") from None
        elif hasattr(self.batches, "load_state_dict"):
            ranks = range(saved_processes) if moved else [acc.process_index]
            files = [path / f"data_rank{rank}.json" for rank in ranks]
            if missing := [f.name for f in files if not f.is_file()]:
                raise ResumeError(f"checkpoint {path} has no data position ({missing[0]})")
            states = [json.loads(f.read_text()) for f in files]
            try:
                self.batches.load_state_dict(states if moved else states[0])
            except ValueError as error:
                raise ResumeError(f"train.resume: checkpoint {path}: {error}") from None
        if moved and not rescaled:
            logger.info(
                "resumed on %d processes a checkpoint written by %d: same global batch, same "
                "sample sequence; dropout and other random draws start anew from the seed",
                acc.num_processes, saved_processes,
            )  # fmt: skip
        if self.episodes is not None:
            saved_accum = self.global_batch // (self.batch_size * saved_processes)
            self._load_episode(path, int(state["step"]), saved_accum)
        return TrainerState(
            step=int(state["step"]),
            nonfinite_steps=int(state["nonfinite_steps"]),
            run_id=str(state.get("run_id", "")),  # "": a checkpoint from before run ids
        )

    def _load_episode(self, path: Path, step: int, saved_accum: int) -> None:
        assert self.episodes is not None
        file = path / EPISODE_FILE
        if file.is_file():
            device = self.accelerator.device
            self.episodes.load({k: v.to(device) for k, v in load_file(str(file)).items()})
            try:
                self.episodes.continue_with(saved_accum)
            except ValueError as error:
                raise ResumeError(f"train.resume: checkpoint {path}: {error}") from None
        elif step > 0:
            raise ResumeError(
                f"train.resume: checkpoint {path} has no {EPISODE_FILE}: it was not written by "
                "an episodic objective"
            )
