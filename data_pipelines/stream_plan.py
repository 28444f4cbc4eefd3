"""Which shards each (rank, worker) reads, and the identity of a stream's batch sequence.

Resampled mode: draw i of a worker picks a shard with its source's weight, from a seed of its
own (so a resume needs no replay of earlier draws). Epoch mode: epoch e's seeded shuffle of all
shards is dealt to ranks, then workers, so shards are disjoint across every (rank, worker)
within an epoch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass

from data_pipelines.shards import shard_sizes


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
    caption_field: str | None
    extra_keys: tuple[str, ...]
    draft_size: int | None
    max_pixels: int
    max_consecutive_errors: int
    remote_timeout: float
    remote_retries: int

    def fingerprint(self) -> str:
        """What a saved position must match: the fields that shape the batch sequence."""
        ignored = {"rank", "max_consecutive_errors", "remote_timeout", "remote_retries"}
        parts = {k: v for k, v in self.__dict__.items() if k not in ignored}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def epoch_plan(spec: StreamSpec, epoch: int) -> list[list[list[int]]]:
    """plan[rank][worker] = this epoch's shard indices: a seeded shuffle dealt to ranks, then
    to workers, so that shards are disjoint across every (rank, worker) within an epoch."""
    order = list(range(len(spec.urls)))
    random.Random(derive_seed(spec.seed, epoch)).shuffle(order)
    return [
        [order[r :: spec.world_size][w :: spec.workers] for w in range(spec.workers)]
        for r in range(spec.world_size)
    ]


def shard_url(spec: StreamSpec, worker: int, epoch: int, index: int) -> str | None:
    """URL of shard ``index`` of ``worker`` in ``epoch`` (None: the epoch is over)."""
    if spec.resampled:  # each draw from its own seed: a resume needs no replay of earlier draws
        draw = random.Random(derive_seed(spec.seed, spec.rank, worker, index, 11))
        return draw.choices(spec.urls, weights=spec.weights)[0]
    mine = epoch_plan(spec, epoch)[spec.rank][worker]
    return spec.urls[mine[index]] if index < len(mine) else None


def epoch_batches(spec: StreamSpec) -> int:
    """Batches per epoch per rank in epoch mode; refuses plans that would leave a worker idle."""
    n = len(spec.urls)
    if n < spec.world_size * spec.workers:
        raise ValueError(
            f"epoch mode needs at least world_size * workers = {spec.world_size} * "
            f"{spec.workers} = {spec.world_size * spec.workers} shards, but the stream has "
            f"{n}; use resampled=True, fewer workers, or write more (smaller) shards"
        )
    sizes = shard_sizes(list(spec.urls))
    for r, per_worker in enumerate(epoch_plan(spec, spec.first_epoch)):
        for w, shards in enumerate(per_worker):
            if sum(sizes[i] for i in shards) < spec.batch_size:
                raise ValueError(
                    f"epoch mode: rank {r} worker {w} gets shards with only "
                    f"{sum(sizes[i] for i in shards)} samples, less than one batch of "
                    f"{spec.batch_size}; use fewer workers, smaller batches or resampled=True"
                )
    batches_per_worker = sum(sizes) // (spec.batch_size * spec.world_size) // spec.workers
    if batches_per_worker == 0:
        raise ValueError(
            f"epoch mode: {sum(sizes)} samples give no full batch of {spec.batch_size} on each "
            f"of {spec.world_size} ranks x {spec.workers} workers"
        )
    return batches_per_worker * spec.workers
