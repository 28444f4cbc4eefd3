"""Which shards each canonical stream reads, and the identity of the global batch sequence.

**Canonical streams** make the sequence independent of how it is computed. A step's global
batch is ``slots`` = M micro-batches of ``batch_size`` (M = processes × ``train.accum_steps``,
fixed by the global batch and the micro-batch size). Stream (slot u, phase p) fills micro-batch
slot u of every step t with t ≡ p modulo the ``period`` P, so there are C = M · P streams, each a
shard sequence, shuffle buffer and seed of its own. Which process, micro-step or data worker
computes a stream changes nothing it yields: a run on N processes × k micro-batches gives the
same steps as N·k micro-batches on one process, and a resume may change N, k and the workers
(M and P are kept: :class:`data_pipelines.stream.TrainStream`). Rank r owns slots
[r·k, (r+1)·k); its micro-batch i (step i // k, slot r·k + i % k) comes from stream
``stream_at(i % cycle)``, ``cycle`` = P·k; a data worker serves every W-th cycle position.
With k = 1 and P = the workers of each rank, stream (r, w) is exactly what rank r's worker w
was before there were canonical streams (the same seeds, shards and fingerprint), so positions
saved then still load.

Resampled mode: draw i of a stream picks a shard with its source's weight, from a seed of its
own (so a resume needs no replay of earlier draws). Epoch mode: epoch e's seeded shuffle of all
shards is dealt, shard by shard, to the least-loaded stream by sample count (from
``sizes.json``), so shards are disjoint across streams within an epoch and the loads are close.
Every stream then yields the same number of batches in epoch e, :func:`epoch_quota` = the
smallest load // batch size; what its shards hold beyond that is dropped
(:func:`epoch_dropped`), so no sample is seen twice and every rank has the same length.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import random
from dataclasses import dataclass, replace


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes (unlike ``hash`` of strings)."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class StreamId:
    """One canonical stream: micro-batch slot ``slot`` of the steps whose number is ``phase``
    modulo the period."""

    slot: int
    phase: int


@dataclass(frozen=True)
class StreamSpec:
    """Everything the batch sequence depends on (and nothing it does not)."""

    urls: tuple[str, ...]
    weights: tuple[float, ...]
    """One per shard: the weight of the source it came from (resampled mode)."""
    batch_size: int
    seed: int
    rank: int
    world_size: int
    workers: int
    """Logical workers of this rank (at least 1, also when the DataLoader has none); one
    divides ``cycle``."""
    resampled: bool
    shuffle_buffer: int
    first_epoch: int
    image_keys: tuple[str, ...]
    text_key: str
    """The caption's member when ``fields`` is empty (``txt`` otherwise)."""
    caption_field: str | None
    """The caption's key in the sample's ``json`` when ``fields`` is empty and it comes from
    there (None otherwise)."""
    extra_keys: tuple[str, ...]
    draft_size: int | None
    max_pixels: int
    max_consecutive_errors: int
    remote_timeout: float
    remote_retries: int
    sizes: tuple[int, ...] = ()
    """Samples per shard (epoch mode; empty when resampled)."""
    shards_in_flight: int = 1
    """Shards a worker reads at once, a sample from each in turn (mixes shards in a batch)."""
    fields: tuple[tuple[str | int, ...], ...] = ()
    """``BatchFields.fingerprint_parts()``; empty for one plain ``image`` view and one whole
    caption (``BatchFields.plain_source``), which ``text_key`` / ``caption_field`` identify
    instead: the fingerprint positions had before there were batch fields, and that every
    CLIP run's positions still have."""
    accum_steps: int = 1
    """Micro-batches per optimizer step on each rank (``train.accum_steps``)."""
    phases: int = 0
    """The period P of the canonical streams (see the module docstring); 0: ``workers``."""
    view_salt: int = 0
    """Which draw of each sample's random choices (image views, sentence choices) the stream
    makes: 0 as always, 1 another one (an episode's second pass reads its samples again with
    fresh views: :meth:`data_pipelines.stream.TrainStream.fresh_views`). Not part of the
    fingerprint: the saved position records it."""

    @property
    def slots(self) -> int:
        """Micro-batches in a step's global batch, M = world_size × accum_steps."""
        return self.world_size * self.accum_steps

    @property
    def period(self) -> int:
        """P: the steps between two batches of one canonical stream."""
        return self.phases or self.workers

    @property
    def streams(self) -> int:
        """C = M · P canonical streams."""
        return self.slots * self.period

    @property
    def cycle(self) -> int:
        """This rank's micro-batches before its streams come round again: P · accum_steps."""
        return self.period * self.accum_steps

    def stream_at(self, position: int) -> StreamId:
        """The stream of cycle position ``position`` (micro-batch i of this rank: i % cycle)."""
        phase, micro = divmod(position, self.accum_steps)
        return StreamId(self.rank * self.accum_steps + micro, phase)

    def number(self, stream: StreamId) -> int:
        """The stream's number among all C (the key of its saved position)."""
        return stream.phase * self.slots + stream.slot

    def stream_of(self, number: int) -> StreamId:
        """The stream numbered ``number`` (inverse of :meth:`number`)."""
        phase, slot = divmod(number, self.slots)
        return StreamId(slot, phase)

    def deal_slot(self, stream: StreamId) -> int:
        """The stream's place in the epoch deal (rank × workers + worker, when streams were
        (rank, worker) pairs)."""
        return stream.slot * self.period + stream.phase

    def rank_streams(self) -> list[StreamId]:
        """This rank's streams, in cycle order."""
        return [self.stream_at(q) for q in range(self.cycle)]

    def fingerprint(self) -> str:
        """What a saved position must match: the fields that shape the global batch sequence
        (M and P, not how processes, micro-steps and workers share it)."""
        ignored = {"rank", "max_consecutive_errors", "remote_timeout", "remote_retries"}
        ignored |= {"accum_steps", "phases", "view_salt"}
        if not self.fields:  # positions saved before there were fields still load
            ignored.add("fields")
        parts = {k: v for k, v in self.__dict__.items() if k not in ignored}
        parts |= {"world_size": self.slots, "workers": self.period}  # their meaning with k = 1
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _epoch_deal(spec: StreamSpec, epoch: int) -> tuple[list[list[int]], list[int]]:
    """(shards, load) per stream, at its ``deal_slot``: epoch ``epoch``'s seeded shuffle, each
    shard dealt to the least-loaded stream (fewest shards, then lowest slot, on ties). A heap
    of (load, shards, slot) finds that slot: O(shards · log streams)."""
    order = list(range(len(spec.urls)))
    random.Random(derive_seed(spec.seed, epoch)).shuffle(order)
    slots = spec.streams
    shards: list[list[int]] = [[] for _ in range(slots)]
    heap = [(0, 0, slot) for slot in range(slots)]  # sorted, so already a heap
    for index in order:
        load, count, slot = heap[0]
        shards[slot].append(index)
        heapq.heapreplace(heap, (load + spec.sizes[index], count + 1, slot))
    loads = [0] * slots
    for load, _, slot in heap:
        loads[slot] = load
    return shards, loads


def epoch_plan(spec: StreamSpec, epoch: int) -> dict[StreamId, list[int]]:
    """This epoch's shard indices per stream of all C, disjoint across streams."""
    shards, _ = _epoch_deal(spec, epoch)
    streams = (spec.stream_of(n) for n in range(spec.streams))
    return {s: shards[spec.deal_slot(s)] for s in streams}


def epoch_quota(spec: StreamSpec, epoch: int) -> int:
    """Batches every stream yields in epoch ``epoch``: the smallest load // batch size.

    Raises:
        ValueError: some stream gets less than one batch of samples.
    """
    shards, loads = _epoch_deal(spec, epoch)
    slot = min(range(len(loads)), key=lambda s: loads[s])
    if loads[slot] < spec.batch_size:
        raise ValueError(
            f"epoch mode, epoch {epoch}: one of the {spec.streams} streams (processes x "
            f"micro-batches x data.workers) gets {len(shards[slot])} shards with only "
            f"{loads[slot]} samples, less than one batch of {spec.batch_size}; use fewer "
            "workers, smaller batches, more (smaller) shards or resampled=True"
        )
    return loads[slot] // spec.batch_size


def epoch_dropped(spec: StreamSpec, epoch: int, rank: int) -> int:
    """Samples of ``rank``'s shards in epoch ``epoch`` that its batches leave out (the rest of
    each of its streams' load beyond ``epoch_quota`` batches)."""
    _, loads = _epoch_deal(spec, epoch)
    used = epoch_quota(spec, epoch) * spec.batch_size
    mine = replace(spec, rank=rank).rank_streams()
    return sum(loads[spec.deal_slot(s)] - used for s in mine)


class WorkerShards:
    """The shard sequence of one stream in one epoch, made once per epoch so that the URL of its
    i-th shard costs O(1) in epoch mode and O(log shards) in resampled mode, whatever the number
    of shards (a reader asks once per shard it opens)."""

    def __init__(self, spec: StreamSpec, stream: StreamId, epoch: int) -> None:
        self.spec, self.stream = spec, stream
        if spec.resampled:
            self._cum_weights = list(itertools.accumulate(spec.weights))
            self.mine: list[int] = []
        else:
            self.mine = _epoch_deal(spec, epoch)[0][spec.deal_slot(stream)]

    @property
    def per_pass(self) -> int | None:
        """How many shards the worker reads in one pass over its epoch (None: resampled)."""
        return None if self.spec.resampled else len(self.mine)

    def url(self, index: int) -> str:
        """URL of shard ``index`` of the sequence. In epoch mode, indices past the worker's
        shards wrap around: a worker whose skipped samples left it short of its quota re-reads
        its own shards (never another worker's or the next epoch's)."""
        spec = self.spec
        if spec.resampled:  # each draw from its own seed: a resume needs no replay of earlier draws
            draw = random.Random(derive_seed(spec.seed, *_ids(self.stream), index, 11))
            # the draw ``choices(urls, weights=...)`` makes, without summing the weights again
            return draw.choices(spec.urls, cum_weights=self._cum_weights)[0]
        return spec.urls[self.mine[index % len(self.mine)]]


def _ids(stream: StreamId) -> tuple[int, int]:
    """The integers a stream's seeds derive from: (rank, worker) when streams were those."""
    return stream.slot, stream.phase


def stream_seed(spec: StreamSpec, stream: StreamId, *parts: int) -> int:
    """A seed of ``stream``'s own: its shuffle slots and samples (``parts``: count, tag)."""
    return derive_seed(spec.seed, *_ids(stream), *parts)


def shard_url(spec: StreamSpec, stream: StreamId, epoch: int, index: int) -> str:
    """URL of shard ``index`` of ``stream``'s sequence in ``epoch`` (one lookup: readers keep a
    :class:`WorkerShards`)."""
    return WorkerShards(spec, stream, epoch).url(index)


def check_epoch_mode(spec: StreamSpec) -> None:
    """Refuse epoch-mode plans that would leave a stream idle or without a batch."""
    n = len(spec.urls)
    if n < spec.streams:
        raise ValueError(
            f"epoch mode needs at least one shard per stream (processes x micro-batches x "
            f"data.workers = {spec.world_size} x {spec.accum_steps} x {spec.period} = "
            f"{spec.streams}), but the stream has {n}; use resampled=True, fewer workers, or "
            "write more (smaller) shards"
        )
    epoch_quota(spec, spec.first_epoch)
