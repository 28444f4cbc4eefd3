"""Which shards each (rank, worker) reads, and the identity of a stream's batch sequence.

Resampled mode: draw i of a worker picks a shard with its source's weight, from a seed of its
own (so a resume needs no replay of earlier draws). Epoch mode: epoch e's seeded shuffle of all
shards is dealt, shard by shard, to the least-loaded (rank, worker) by sample count (from
``sizes.json``), so shards are disjoint across every (rank, worker) within an epoch and the
loads are close. Every (rank, worker) then yields the same number of batches in epoch e,
:func:`epoch_quota` = the smallest load // batch size; what its shards hold beyond that is
dropped (:func:`epoch_dropped`), so no sample is seen twice and every rank has the same length.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import random
from dataclasses import dataclass


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes (unlike ``hash`` of strings)."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFF


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
    """Logical workers of this rank (at least 1, also when the DataLoader has none)."""
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

    def fingerprint(self) -> str:
        """What a saved position must match: the fields that shape the batch sequence."""
        ignored = {"rank", "max_consecutive_errors", "remote_timeout", "remote_retries"}
        if not self.fields:  # positions saved before there were fields still load
            ignored.add("fields")
        parts = {k: v for k, v in self.__dict__.items() if k not in ignored}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _epoch_deal(spec: StreamSpec, epoch: int) -> tuple[list[list[int]], list[int]]:
    """(shards, load) per slot ``rank * workers + worker``: epoch ``epoch``'s seeded shuffle,
    each shard dealt to the least-loaded slot (fewest shards, then lowest slot, on ties). A heap
    of (load, shards, slot) finds that slot: O(shards · log slots)."""
    order = list(range(len(spec.urls)))
    random.Random(derive_seed(spec.seed, epoch)).shuffle(order)
    slots = spec.world_size * spec.workers
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


def epoch_plan(spec: StreamSpec, epoch: int) -> list[list[list[int]]]:
    """plan[rank][worker] = this epoch's shard indices, disjoint across every (rank, worker)."""
    shards, _ = _epoch_deal(spec, epoch)
    return [shards[r * spec.workers : (r + 1) * spec.workers] for r in range(spec.world_size)]


def epoch_quota(spec: StreamSpec, epoch: int) -> int:
    """Batches every (rank, worker) yields in epoch ``epoch``: the smallest load // batch size.

    Raises:
        ValueError: some (rank, worker) gets less than one batch of samples.
    """
    shards, loads = _epoch_deal(spec, epoch)
    slot = min(range(len(loads)), key=lambda s: loads[s])
    if loads[slot] < spec.batch_size:
        rank, worker = divmod(slot, spec.workers)
        raise ValueError(
            f"epoch mode, epoch {epoch}: rank {rank} worker {worker} gets {len(shards[slot])} "
            f"shards with only {loads[slot]} samples, less than one batch of {spec.batch_size}; "
            "use fewer workers, smaller batches, more (smaller) shards or resampled=True"
        )
    return loads[slot] // spec.batch_size


def epoch_dropped(spec: StreamSpec, epoch: int, rank: int) -> int:
    """Samples of ``rank``'s shards in epoch ``epoch`` that its batches leave out (the rest of
    each worker's load beyond ``epoch_quota`` batches)."""
    _, loads = _epoch_deal(spec, epoch)
    used = epoch_quota(spec, epoch) * spec.batch_size
    return sum(load - used for load in loads[rank * spec.workers : (rank + 1) * spec.workers])


class WorkerShards:
    """The shard sequence of one (rank, worker) in one epoch, made once per epoch so that the
    URL of its i-th shard costs O(1) in epoch mode and O(log shards) in resampled mode, whatever
    the number of shards (a reader asks once per shard it opens)."""

    def __init__(self, spec: StreamSpec, worker: int, epoch: int) -> None:
        self.spec, self.worker = spec, worker
        if spec.resampled:
            self._cum_weights = list(itertools.accumulate(spec.weights))
            self.mine: list[int] = []
        else:
            self.mine = epoch_plan(spec, epoch)[spec.rank][worker]

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
            draw = random.Random(derive_seed(spec.seed, spec.rank, self.worker, index, 11))
            # the draw ``choices(urls, weights=...)`` makes, without summing the weights again
            return draw.choices(spec.urls, cum_weights=self._cum_weights)[0]
        return spec.urls[self.mine[index % len(self.mine)]]


def shard_url(spec: StreamSpec, worker: int, epoch: int, index: int) -> str:
    """URL of shard ``index`` of ``worker``'s sequence in ``epoch`` (one lookup: readers keep a
    :class:`WorkerShards`)."""
    return WorkerShards(spec, worker, epoch).url(index)


def check_epoch_mode(spec: StreamSpec) -> None:
    """Refuse epoch-mode plans that would leave a (rank, worker) idle or without a batch."""
    n = len(spec.urls)
    if n < spec.world_size * spec.workers:
        raise ValueError(
            f"epoch mode needs at least world_size * workers = {spec.world_size} * "
            f"{spec.workers} = {spec.world_size * spec.workers} shards, but the stream has "
            f"{n}; use resampled=True, fewer workers, or write more (smaller) shards"
        )
    epoch_quota(spec, spec.first_epoch)
