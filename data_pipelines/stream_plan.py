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
    each shard dealt to the least-loaded slot (fewest shards, then lowest slot, on ties)."""
    order = list(range(len(spec.urls)))
    random.Random(derive_seed(spec.seed, epoch)).shuffle(order)
    slots = spec.world_size * spec.workers
    shards: list[list[int]] = [[] for _ in range(slots)]
    loads = [0] * slots
    for index in order:
        slot = min(range(slots), key=lambda s: (loads[s], len(shards[s]), s))
        shards[slot].append(index)
        loads[slot] += spec.sizes[index]
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


def shard_url(spec: StreamSpec, worker: int, epoch: int, index: int) -> str:
    """URL of shard ``index`` of ``worker``'s sequence in ``epoch``. In epoch mode, indices past
    the worker's shards wrap around: a worker whose skipped samples left it short of its quota
    re-reads its own shards (never another worker's or the next epoch's)."""
    if spec.resampled:  # each draw from its own seed: a resume needs no replay of earlier draws
        draw = random.Random(derive_seed(spec.seed, spec.rank, worker, index, 11))
        return draw.choices(spec.urls, weights=spec.weights)[0]
    mine = epoch_plan(spec, epoch)[spec.rank][worker]
    return spec.urls[mine[index % len(mine)]]


def shards_per_pass(spec: StreamSpec, worker: int, epoch: int) -> int | None:
    """How many shards ``worker`` reads in one pass over its epoch (None: resampled, endless)."""
    return None if spec.resampled else len(epoch_plan(spec, epoch)[spec.rank][worker])


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
