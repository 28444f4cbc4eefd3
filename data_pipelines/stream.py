"""The training stream: shards -> batches, deterministic, resumable exactly, never hanging.

The global batch sequence is made of *canonical streams* (:mod:`data_pipelines.stream_plan`):
each an infinite sequence of batches that is a pure function of (seed, config, the global
micro-batch count M, the period P, its own number), never of how many processes, micro-steps
or data workers share them. Which shards a stream reads is :mod:`data_pipelines.stream_plan`,
how it turns them into batches :mod:`data_pipelines.worker_stream`. This module runs this
rank's streams on its data workers (worker w serves cycle positions w, w + W, ...) and keeps
the positions.

Every batch carries its stream's position after it: the epoch and the batches yielded in it,
the shards in flight with their next sample and the next shard to open, the emission count, and
the references (epoch, shard, sample) of the samples in the shuffle buffer. The main process
keeps the position of the last CONSUMED batch of every stream (prefetched batches are not
consumed) and how many micro-batches it handed out; that is the stream's ``state_dict``. A
resumed stream re-reads only the shards that hold the buffered samples or are in flight,
skipping tar members without decoding images, and starts each worker at the cycle position its
next batch comes from. DataLoader hands out batches round-robin over workers, and every stream is
infinite, so the order is fixed. The positions of all ranks (:func:`merge_states`) resume on
another number of processes, micro-steps or workers, as long as M = processes × micro-steps
stays: the global batch and the micro-batch size.

Never hang: epoch mode with fewer shards than ranks × workers fails at construction; a worker
whose samples all fail stops after ``max_consecutive_errors``; a dead worker is reported by the
DataLoader within seconds; a remote shard that stalls raises ``RemoteShardError``
(``remote``); and ``StreamSettings.timeout`` bounds the wait for any batch.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.batch_fields import BatchFields
from data_pipelines.remote import register_remote_openers
from data_pipelines.shards import (
    Urls,
    count_samples,
    expand_urls,
    shard_sizes,
    sizes_of,
    split_sources,
)
from data_pipelines.stream_plan import (
    StreamSpec,
    check_epoch_mode,
    derive_seed,
    epoch_dropped,
    epoch_quota,
    shard_url,
)
from data_pipelines.stream_positions import STATE_VERSION, merge_states
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.text_sources import JSON_PREFIX
from data_pipelines.worker_stream import SkipCounts, TooManyBadSamples, worker_batches

__all__ = [
    "BatchFields",
    "BatchTimeout",
    "SkipCounts",
    "StreamSettings",
    "StreamSpec",
    "TooManyBadSamples",
    "TrainStream",
    "count_samples",
    "derive_seed",
    "expand_urls",
    "make_train_stream",
    "merge_states",
    "shard_sizes",
]

logger = logging.getLogger("data_pipelines.stream")


LIVENESS_POLL_S = 5.0
"""How often a wait for a batch checks that the workers are alive. The DataLoader checks only
when its own ``timeout`` runs out, so it gets this one, and the stream waits in these slices up
to ``StreamSettings.timeout``: a worker that died after its last batch was received (the OOM
killer) is an error within seconds, not after ``data.batch_timeout`` (600 s by default)."""


class BatchTimeout(RuntimeError):
    """No batch came from the data workers within ``data.batch_timeout`` seconds."""


class DataWorkerDied(RuntimeError):
    """A DataLoader worker process exited (a codec crash, the OOM killer); names the worker,
    its rank and the shards it was reading."""


class _WorkerDataset(IterableDataset):
    """What each DataLoader worker iterates: the batches of the cycle positions it serves."""

    def __init__(
        self,
        spec: StreamSpec,
        starts: dict[int, dict[str, Any]],
        first: int,
        fields: BatchFields,
    ) -> None:
        self.spec, self.starts, self.first = spec, starts, first
        self.fields = fields

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:
            _leave_stop_signals_to_the_trainer()
        physical, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Workers started with "spawn" import webdataset afresh: route remote schemes again.
        register_remote_openers(self.spec.remote_timeout, self.spec.remote_retries)
        return _serve(self.spec, self.starts, self.first + physical, workers, self.fields)


def _serve(
    spec: StreamSpec,
    starts: dict[int, dict[str, Any]],
    first: int,
    every: int,
    fields: BatchFields,
) -> Iterator[dict[str, Any]]:
    """The batches of cycle positions ``first``, ``first + every``, ... (modulo the cycle),
    each the next of its own stream: one DataLoader worker's share of the rank's sequence."""
    cycle = spec.cycle
    served = [spec.stream_at((first + n * every) % cycle) for n in range(cycle // every)]
    sequences = [
        worker_batches(spec, stream, starts.get(spec.number(stream)), fields) for stream in served
    ]
    while True:
        for sequence in sequences:
            yield next(sequence)


def _leave_stop_signals_to_the_trainer() -> None:
    """In a data worker: a terminal's Ctrl-C and a scheduler's preemption notice (SIGTERM,
    SIGUSR1) reach every process of the group, workers included; the trainer acts on them
    (its step, a checkpoint) and then ends its workers. So a worker ignores Ctrl-C and the
    first notice of each kind; a second SIGTERM ends it, and the stream kills a worker that
    outlives the DataLoader's shutdown (:func:`_end_stragglers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _ignore_once)


def _ignore_once(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)


def _end_stragglers(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Kill the workers still alive once the DataLoader has shut them down: one stuck in a
    transform or a read ignored its ``terminate()``, which may have been the first SIGTERM it
    got (see :func:`_leave_stop_signals_to_the_trainer`)."""
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=LIVENESS_POLL_S)


def _as_is(batch: Any) -> Any:
    """The DataLoader's collate for ready-made batches (its default walks every list element
    of the position record: ~0.2 ms per sample)."""
    return batch


def _without_sigchld_errors(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` without torch's SIGCHLD handler, which raises "DataLoader worker exited
    unexpectedly" wherever the main thread happens to be when a worker dies: in the trainer's
    code or the caller's, where no one can say which shard it was reading (a flaky test showed
    it). Without it the loader finds the dead worker itself, inside ``next()`` (0.1-0.2 s after
    a worker's ``os._exit`` here), where :class:`TrainStream` names the worker and its shard
    (:class:`DataWorkerDied`)."""
    if threading.current_thread() is not threading.main_thread():
        return iter(loader)  # torch installs no handler off the main thread
    previous = signal.getsignal(signal.SIGCHLD)
    batches = iter(loader)
    signal.signal(signal.SIGCHLD, previous)
    return batches


class TrainStream:
    """This rank's training batches, with ``state_dict``/``load_state_dict`` for exact resume.

    Iterating yields batch dicts with ``fields.batch_keys()`` and ``settings.extra_keys``:
    forever in resampled mode; ``len(stream)`` batches per ``iter()`` in epoch mode (iterate
    again for the next epoch). ``len`` is the current epoch's count: the same on every rank, and
    it may differ from epoch to epoch (each epoch deals the shards anew). ``skips`` holds what
    was skipped, per shard; ``dropped`` the samples that epochs left over (see ``stream_plan``).
    """

    def __init__(self, spec: StreamSpec, fields: BatchFields, settings: StreamSettings) -> None:
        self.spec, self.fields, self.settings = spec, fields, settings
        self.epoch = spec.first_epoch
        """The epoch of the last batch handed out (epoch mode; the next ``iter()`` moves on to
        the next epoch once this one's ``len()`` batches are out)."""
        self.dropped = 0
        """Samples left over (not in any batch) by the epochs started so far (epoch mode)."""
        self.skips = SkipCounts()
        self._positions: dict[int, dict[str, Any]] = {}
        """The position after the last consumed batch, per stream number."""
        self._consumed = 0
        """Micro-batches handed out in this epoch (all of them, resampled)."""
        self._first_of_pass = 0
        self._redrawn_at: int | None = None

    @property
    def dataset(self) -> _WorkerDataset:
        """The IterableDataset the DataLoader runs (picklable, for the spawn start method)."""
        first = self._consumed % self.spec.cycle
        return _WorkerDataset(self.spec, dict(self._positions), first, self.fields)

    def __len__(self) -> int:
        """Batches per epoch on this rank; a ``TypeError`` for the infinite resampled stream."""
        if self.spec.resampled:
            raise TypeError("a resampled stream is infinite and has no len()")
        return self.spec.cycle * epoch_quota(self.spec, self.epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.spec.workers if self.settings.workers else 0
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.settings.prefetch_factor if workers else None,
            timeout=min(self.settings.timeout, LIVENESS_POLL_S) if workers else 0,
            persistent_workers=False,
            pin_memory=self.settings.pin_memory,
            collate_fn=_as_is,
            # Each iterator draws a base seed (its workers' seeds, unused: samples are seeded
            # by their place in the stream); from a generator of its own, not the trainer's.
            generator=torch.Generator().manual_seed(self.spec.seed),
        )
        if not self.spec.resampled and self._consumed >= len(self):  # the last epoch is over
            self._consumed, self.epoch = 0, self.epoch + 1
        self._first_of_pass = self._consumed
        remaining = None if self.spec.resampled else len(self) - self._consumed
        if remaining is not None and self._consumed == 0:
            dropped = epoch_dropped(self.spec, self.epoch, self.spec.rank)
            self.dropped += dropped
            logger.info(
                "epoch %d: rank %d yields %d batches; %d samples of its shards are left over "
                "and dropped (%d so far)",
                self.epoch, self.spec.rank, remaining, dropped, self.dropped,
            )  # fmt: skip
        started_before = set(multiprocessing.active_children())
        batches = _without_sigchld_errors(loader)
        worker_processes = [p for p in multiprocessing.active_children() if p not in started_before]
        try:
            while True:
                try:
                    batch = self._next_within_timeout(batches)
                except StopIteration:
                    return
                meta = batch.pop("__stream__")
                self._positions[meta["stream"]] = meta["position"]
                self.skips.add(meta["counts"])
                self._check_skips()
                self._consumed += 1
                yield batch
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return
        except (ConnectionError, EOFError, RuntimeError) as error:
            dead = isinstance(error, (ConnectionError, EOFError)) or (
                "exited unexpectedly" in str(error)  # the DataLoader's own check
            )
            if not workers or not dead:
                raise
            # A worker that dies while its batch is being received shows up as a broken pipe
            # before the DataLoader's own "exited unexpectedly" check runs.
            raise DataWorkerDied(
                f"data worker {self._next_worker()} of rank {self.spec.rank} (a DataLoader worker "
                f"process) exited unexpectedly while reading {self._whereabouts()} ({error}); its own log "
                "lines above say why (a crash in an image codec or the transform, or the OOM "
                "killer: then lower data.workers or data.prefetch_factor)"
            ) from error
        finally:
            del batches  # shuts the workers down now, so no late SIGCHLD error escapes
            _end_stragglers(worker_processes)

    def _next_within_timeout(self, batches: Iterator[Any]) -> Any:
        """The next batch, waiting at most ``settings.timeout`` seconds in slices of the
        DataLoader's own timeout, after each of which it has checked its workers' liveness."""
        started = time.monotonic()
        while True:
            try:
                return next(batches)
            except RuntimeError as error:
                if not str(error).startswith("DataLoader timed out"):
                    raise
                waited = time.monotonic() - started
                if waited >= self.settings.timeout:
                    raise BatchTimeout(
                        f"no batch from data worker {self._next_worker()} of rank "
                        f"{self.spec.rank} within {waited:.0f} s (data.batch_timeout="
                        f"{self.settings.timeout:g}) while reading "
                        f"{self._whereabouts()}: a stalled file system or a "
                        "transform that hangs"
                    ) from error

    def _next_worker(self) -> int:
        """The DataLoader worker the next batch comes from."""
        return (self._consumed - self._first_of_pass) % self.spec.workers

    def _whereabouts(self) -> str:
        """The shards the next batch's stream had open after its last batch consumed here (it
        may be a few prefetched batches further, in those shards or the next of its sequence)."""
        stream = self.spec.stream_at(self._consumed % self.spec.cycle)
        position = self._positions.get(self.spec.number(stream))
        try:
            if position is None:
                return f"shard {shard_url(self.spec, stream, self.spec.first_epoch, 0)} or later"
            epoch = int(position["epoch"])
            shards = [int(i) for i, _ in position["open"]] or [int(position["next_shard"])]
            urls = ", ".join(dict.fromkeys(shard_url(self.spec, stream, epoch, i) for i in shards))
        except (KeyError, TypeError, ValueError, IndexError):
            return "an unknown shard"
        return f"shard {urls} or later"

    def _check_skips(self) -> None:
        seen, limit = self.skips.ok + self.skips.skipped, self.settings.max_skip_fraction
        if seen < 10 * self.spec.batch_size or self.skips.skipped <= limit * seen:
            return
        worst = sorted(self.skips.by_shard.items(), key=lambda item: -item[1])[:3]
        raise TooManyBadSamples(
            f"{self.skips.skipped} of {seen} samples skipped "
            f"({self.skips.skipped / seen:.1%} > data.max_skip_fraction="
            f"{limit}); worst shards: "
            + "; ".join(f"{url} ({n}: {self.skips.reasons.get(url, '')})" for url, n in worst)
        )

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (JSON-ready): this rank's streams."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.spec.fingerprint(),
            "world_size": self.spec.world_size,
            "accum_steps": self.spec.accum_steps,
            "workers": self.spec.workers,
            "rank": self.spec.rank,
            "slots": self.spec.slots,
            "period": self.spec.period,
            "epoch": self.epoch,
            "consumed_in_epoch": self._consumed,
            "dropped": self.dropped,
            "positions": {str(n): p for n, p in self._positions.items()},
            "skips": self.skips.to_json(),
            **({"fields": [list(p) for p in self.spec.fields]} if self.spec.fields else {}),
            **({"redrawn_at": self._redrawn_at} if self._redrawn_at is not None else {}),
            **({"view_salt": self.spec.view_salt} if self.spec.view_salt else {}),
        }

    def fresh_views(self) -> None:
        """From the next ``iter()`` on, draw every sample's random choices (image views,
        sentence choices) anew: after :meth:`load_state_dict` of an earlier position, the
        samples read again come with other views than the first time (ProtoCLIP's pass 2,
        :mod:`vlp.training.episodes`). The stream alternates between two draws, both a
        function of the sample's place in the stream, and its positions record which one is
        on, so a resume continues with it."""
        self.spec = dataclasses.replace(self.spec, view_salt=1 - self.spec.view_salt)

    def redraw(self, step: int) -> None:
        """Start a sequence of its own, seeded by (seed, ``step``): after a resume that changed
        the global batch (``train.elastic=rescale_lr``), where the saved sequence has no
        continuation. Later positions record it, so they resume into it.

        Raises:
            ValueError: epoch mode (an epoch begun again would repeat some of its samples).
        """
        if not self.spec.resampled:
            raise ValueError(
                "train.elastic=rescale_lr needs data.resampled=true: at another global batch the "
                "epoch would begin again and see some of its samples twice"
            )
        self._redrawn_at = step
        seed = derive_seed(self.settings.seed, step, 31)
        self.spec = dataclasses.replace(self.spec, seed=seed)
        self._positions, self._consumed = {}, 0

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from ``state_dict()`` of this rank, or of every rank (a list, or
        :func:`merge_states` of it), of a stream with the same data configuration and M =
        processes × micro-steps (processes, micro-steps and workers may differ; the period P
        is the saved one).

        Raises:
            ValueError: the state comes from another stream configuration (shards, batch size,
                seed, shuffle, keys, fields, global batch) or lacks this rank's streams.
        """
        if isinstance(state, list):
            state = merge_states(state)
        elif "ranks" not in state:
            state = merge_states([state])
        if state.get("redrawn_at") is not None:
            self.redraw(int(state["redrawn_at"]))
        saved_fields, my_fields = state.get("fields", []), [list(p) for p in self.spec.fields]
        if state["slots"] != self.spec.slots and state.get("version") == 2:
            raise ValueError(
                f"the saved data position was written before canonical streams (version 2) by "
                f"{state['slots']} processes; it resumes only as {state['slots']} micro-batches "
                f"per step (processes x train.accum_steps), this run has {self.spec.slots}: "
                "resume with the vlp that wrote it, or start a new train.out_dir"
            )
        if state["slots"] != self.spec.slots:
            raise ValueError(
                f"the saved data position has {state['slots']} micro-batches per step "
                f"(processes x train.accum_steps), this run {self.spec.slots} "
                f"({self.spec.world_size} x {self.spec.accum_steps}): resume with a global batch "
                f"of {state['slots']} micro-batches of data.batch_size"
            )
        saved_streams = state["slots"] * state["period"]
        if self.settings.streams not in (0, saved_streams):
            raise ValueError(
                f"the saved data position has {saved_streams} canonical streams, this run asks "
                f"for data.streams={self.settings.streams}: resume with data.streams="
                f"{saved_streams} (or 0: the checkpoint's)"
            )
        spec = self._with_period(int(state["period"]))
        if state.get("fingerprint") != spec.fingerprint() and saved_fields != my_fields:
            raise ValueError(
                f"the saved data position was written by a stream with batch fields "
                f"[{_describe(saved_fields)}], this run reads [{_describe(my_fields)}] (image "
                "views, text fields, json fields, presets, tokenizers or sentence choice "
                "changed); resume with the same objective and fields"
            )
        if state.get("fingerprint") != spec.fingerprint():
            raise ValueError(
                "the saved data position belongs to another stream configuration (shards, "
                "batch size, seed, shuffle buffer or keys changed); resume with the same data "
                "config"
            )
        positions = {int(n): p for n, p in state["positions"].items()}
        consumed = state["steps_in_epoch"] * spec.accum_steps
        mine = [spec.number(s) for s in spec.rank_streams()]
        if consumed and (missing := [n for n in mine if n not in positions]):
            raise ValueError(
                f"the saved data position has no position for stream {missing[0]} of rank "
                f"{spec.rank}: pass the positions of every rank (merge_states)"
            )
        self.spec = dataclasses.replace(spec, view_salt=int(state.get("view_salt", 0)))
        self._positions = {n: positions[n] for n in mine if n in positions}
        self._consumed = consumed
        self.epoch = int(state["epoch"])
        ranks = state["ranks"]
        # Counts of ranks this run no longer has go to rank 0.
        own = [
            r
            for r in ranks
            if r["rank"] == spec.rank or (spec.rank == 0 and r["rank"] >= spec.world_size)
        ]
        self.dropped = sum(int(r["dropped"]) for r in own)
        self.skips = SkipCounts()
        for r in own:
            self.skips.add({k: r["skips"][k] for k in ("ok", "by_shard", "reasons")})

    def _with_period(self, period: int) -> StreamSpec:
        """The spec with the period ``period`` and as many workers as divide the new cycle."""
        cycle = period * self.spec.accum_steps
        workers = serving_workers(self.settings.workers, cycle)
        return dataclasses.replace(self.spec, phases=period, workers=workers)


def serving_workers(requested: int, cycle: int) -> int:
    """The logical workers of a rank: the most that divide ``cycle`` (each serves every
    W-th micro-batch of the rank's cycle), at most ``requested`` (at least 1)."""
    return max(w for w in range(1, max(requested, 1) + 1) if cycle % w == 0)


def _describe(parts: Sequence[Sequence[Any]]) -> str:
    """Fingerprint parts of batch fields, for a message (``view image openclip; ...``)."""
    if not parts:
        return "view 'image', text 'text' (one image and its whole caption)"
    return "; ".join(" ".join(str(x) for x in part if x != "") for part in parts)


def stream_period(streams: int, world_size: int, accum_steps: int, workers: int) -> int:
    """P, the phases of each micro-batch slot: ``data.streams`` = processes x accum_steps x P,
    or P = ``workers`` (at least 1) when ``streams`` is 0 (a first start).

    Raises:
        ValueError: ``streams`` is not a multiple of processes x accum_steps.
    """
    slots = world_size * accum_steps
    if streams % slots:
        raise ValueError(
            f"data.streams={streams} is not a multiple of processes x train.accum_steps = "
            f"{world_size} x {accum_steps} = {slots}"
        )
    return streams // slots or max(workers, 1)


def make_train_stream(
    urls: Urls,
    settings: StreamSettings,
    *,
    fields: BatchFields,
    rank: int = 0,
    world_size: int = 1,
) -> TrainStream:
    """Build this rank's training stream (see the module docstring for what it guarantees).

    Args:
        urls: shards: a folder, brace pattern, fsspec URL, or several sources joined with
            ``::`` (or a list of them).
        settings: what the ``data`` section decides (:mod:`data_pipelines.stream_settings`),
            the same on every rank.
        fields: what the batch carries (:mod:`data_pipelines.batch_fields`): named image
            views, text fields and JSON fields; one image and one caption is
            ``BatchFields.single(transform, tokenizer, source)``. Its ``fingerprint_parts()``
            join the resume fingerprint, except for exactly that single view and text, whose
            fingerprint is the one positions have always been saved with.
        rank, world_size: this process among the data-parallel ranks.

    Raises:
        ValueError: a rank outside the world, ``settings.extra_keys`` that clash with the
            batch keys, source weights in epoch mode, ``settings.streams`` that is not a
            multiple of world_size × accum_steps, or an epoch plan with fewer shards than
            streams or a stream without one batch.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    reserved = (*fields.batch_keys(), "__stream__")
    if clash := [k for k in settings.extra_keys if k in reserved]:
        raise ValueError(f"extra_keys {clash} clash with the batch keys {reserved}")
    register_remote_openers(settings.remote_timeout, settings.remote_retries)
    shard_urls, shard_weights = split_sources(urls, settings.weights)
    if not settings.resampled and len(set(shard_weights)) > 1:
        raise ValueError("data.train_weights need resampled=True (epoch mode reads every shard)")
    text_key, caption_field, parts = _fingerprint_fields(fields)
    period = stream_period(settings.streams, world_size, settings.accum_steps, settings.workers)
    spec = StreamSpec(
        urls=tuple(shard_urls),
        weights=tuple(shard_weights),
        batch_size=settings.batch_size,
        seed=settings.seed,
        rank=rank,
        world_size=world_size,
        workers=serving_workers(settings.workers, period * settings.accum_steps),
        resampled=settings.resampled,
        shuffle_buffer=settings.shuffle_buffer,
        first_epoch=settings.epoch,
        image_keys=tuple(settings.image_keys),
        text_key=text_key,
        caption_field=caption_field,
        extra_keys=tuple(settings.extra_keys),
        draft_size=settings.draft_size,
        max_pixels=settings.max_pixels,
        max_consecutive_errors=settings.max_consecutive_errors,
        remote_timeout=settings.remote_timeout,
        remote_retries=settings.remote_retries,
        sizes=() if settings.resampled else tuple(sizes_of(shard_urls)),
        shards_in_flight=settings.shards_in_flight,
        fields=parts,
        accum_steps=settings.accum_steps,
        phases=period,
    )
    if not settings.resampled:
        check_epoch_mode(spec)
    return TrainStream(spec, fields, settings)


def _fingerprint_fields(
    fields: BatchFields,
) -> tuple[str, str | None, tuple[tuple[str | int, ...], ...]]:
    """(text_key, caption_field, fields) of the spec: what identifies ``fields`` in it.

    One plain image view and one whole caption from a member or ``json:<key>``
    (:meth:`BatchFields.plain_source`) is the batch positions were saved with before there
    were batch fields, and every CLIP run still saves: it is identified by where the caption
    comes from, so those positions keep loading. Any other fields by their fingerprint parts.
    """
    plain = fields.plain_source()
    if plain is None:
        return "txt", None, fields.fingerprint_parts()
    if plain.startswith(JSON_PREFIX):
        return "txt", plain[len(JSON_PREFIX) :], ()
    return plain, None, ()
