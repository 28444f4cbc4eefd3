"""The training stream: webdataset 1.x shards -> batches of image tensors and tokens (DESIGN §5).

shard list (resampled with replacement | shuffled per epoch and split by rank, then worker)
-> tar expansion (errors counted, not fatal) -> seeded sample shuffle (on raw bytes, cheap)
-> decode + preprocess -> batch + tokenize. Every random choice is seeded from
(seed, rank, worker, epoch), so the batches are a pure function of the arguments.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from data_pipelines.shards import Urls, count_samples, expand_urls, shard_sizes

__all__ = [
    "SampleError",
    "SkipCounter",
    "TrainLoader",
    "count_samples",
    "derive_seed",
    "expand_urls",
    "make_train_stream",
    "shard_sizes",
]

logger = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
_RESERVED = ("image", "text", "__key__")


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes (unlike ``hash`` of strings)."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFF


class SampleError(Exception):
    """A sample that cannot be used (corrupt image, missing member); skipped and counted."""

    def __init__(self, message: str, url: str | None, key: str | None) -> None:
        super().__init__(message)
        self.url, self.key = url, key


class SkipCounter:
    """Counts what the stream skipped, per shard, and stops a stream that only skips.

    Used as webdataset ``handler``: corrupt tars and undecodable samples are logged, counted and
    skipped; ``max_consecutive`` failures in a row (every shard broken, every image unreadable)
    raise instead of spinning forever. Counts live in the process that iterates: with
    ``workers > 0`` each worker keeps its own.
    """

    def __init__(self, urls: Iterable[str] = (), max_consecutive: int = 1000) -> None:
        self.urls = frozenset(urls)
        self.max_consecutive = max_consecutive
        self.total = 0
        self.by_shard: dict[str, int] = {}
        self._consecutive = 0

    def ok(self) -> None:
        """Record a successful sample (resets the consecutive-failure count)."""
        self._consecutive = 0

    def _skip(self, exn: Exception, url: str | None) -> bool:
        self.total += 1
        self._consecutive += 1
        name = url or "<unknown shard>"
        self.by_shard[name] = self.by_shard.get(name, 0) + 1
        if self.total <= 10 or self.total % 100 == 0:
            logger.warning("skipped sample (%d so far) in %s: %r", self.total, name, exn)
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self._consecutive} consecutive samples failed, the last in {name}: {exn!r}; "
                "are the shards readable and image_keys / text_key / extra_keys right?"
            ) from exn
        return True

    def tar_handler(self, exn: Exception) -> bool:
        """Handler for shard opening / tar reading: skip the rest of the shard and count it."""
        # webdataset appends the shard URL to exn.args (not always last, not always at all).
        url = next((a for a in exn.args if isinstance(a, str) and a in self.urls), None)
        if url is None:
            url = next((u for u in self.urls if u in str(exn)), None)
        return self._skip(exn, url)

    def sample_handler(self, exn: Exception) -> bool:
        """Handler for decoding: skip a ``SampleError``; anything else (a bug) propagates."""
        if not isinstance(exn, SampleError):
            raise exn
        return self._skip(exn, exn.url)


def _decode_extra(suffix: str, data: bytes) -> Any:
    if suffix == "json":
        return json.loads(data)
    if suffix in ("cls", "cls2", "index", "id"):
        return int(data)
    if suffix in ("txt", "text"):
        return data.decode("utf-8")
    return data


def _decode_sample(
    sample: dict[str, Any],
    *,
    preprocess: Preprocess,
    image_keys: tuple[str, ...],
    text_key: str,
    extra_keys: tuple[str, ...],
    draft_size: int | None,
    counter: SkipCounter,
) -> dict[str, Any]:
    url, key = sample.get("__url__"), sample.get("__key__")
    try:
        img_key = next((k for k in image_keys if k in sample), None)
        if img_key is None:
            raise KeyError(f"no image member (looked for {image_keys}), has {sorted(sample)}")
        with Image.open(io.BytesIO(sample[img_key])) as im:
            if draft_size:  # JPEG only: decode at reduced scale, still >= draft_size
                im.draft("RGB", (draft_size, draft_size))
            image = im.convert("RGB")
        text = sample[text_key].decode("utf-8")
        extras = {k: _decode_extra(k, sample[k]) for k in extra_keys}
    except Exception as exn:
        raise SampleError(f"shard {url} sample {key}: {exn!r}", url, key) from exn
    counter.ok()
    return {"__key__": key, "image": preprocess(image), "text": text, **extras}


def _collate(
    samples: list[dict[str, Any]], *, tokenizer: Tokenizer, extra_keys: tuple[str, ...]
) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "text": tokenizer([s["text"] for s in samples]),
        "__key__": [s["__key__"] for s in samples],
    }
    for k in extra_keys:
        values = [s[k] for s in samples]
        if all(isinstance(v, int) for v in values):
            batch[k] = torch.tensor(values, dtype=torch.long)
        elif all(isinstance(v, torch.Tensor) for v in values):
            batch[k] = torch.stack(values)
        else:
            batch[k] = values
    return batch


def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _worker_seed(seed: int, rank: int, epoch: int) -> int:
    return derive_seed(seed, rank, _worker_id(), epoch)


def _seeded_shuffle(
    src: Iterable[Any], *, bufsize: int, seed: int, rank: int, epoch: int
) -> Iterator[Any]:
    # The worker id is only known once iteration starts inside the worker.
    seed_here = derive_seed(seed, rank, _worker_id(), epoch, 1)
    return wds.shuffle(bufsize, bufsize, seed=seed_here)(src)


class TrainLoader(DataLoader):
    """The DataLoader ``make_train_stream`` returns, with the stream's bookkeeping attached.

    ``skips``: the decode-error counter (per process); ``num_batches``: batches per epoch on
    this rank in epoch mode, ``None`` for the infinite resampled stream.
    """

    def __init__(
        self, dataset: Any, *, skips: SkipCounter, num_batches: int | None, **kw: Any
    ) -> None:
        super().__init__(dataset, **kw)
        self.skips = skips
        self.num_batches = num_batches

    def __len__(self) -> int:
        """Batches per epoch on this rank; a ``TypeError`` for the infinite resampled stream."""
        if self.num_batches is None:
            raise TypeError("a resampled stream is infinite and has no len()")
        return self.num_batches


def _epoch_plan(
    n_shards: int, *, seed: int, epoch: int, world_size: int, workers: int
) -> tuple[list[int], list[list[list[int]]]]:
    """Shuffle shard indices for the epoch; rank r reads order[r::world_size] and its worker w
    reads that list's [w::workers] (what ``split_by_worker`` does). Returns (order, plan) with
    plan[r][w] = shard indices."""
    order = list(range(n_shards))
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    plan = [[order[r::world_size][w::workers] for w in range(workers)] for r in range(world_size)]
    return order, plan


def make_train_stream(
    urls: Urls,
    *,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    seed: int = 0,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    epoch: int = 0,
    image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
    text_key: str = "txt",
    extra_keys: Sequence[str] = (),
    draft_size: int | None = None,
) -> TrainLoader:
    """Build this rank's training stream: a DataLoader yielding batch dicts.

    Each batch is ``{"image": float[B,3,H,W], "text": long[B,ctx], "__key__": [B keys], **extra}``
    (``extra_keys`` members decoded: json -> dict, cls -> LongTensor, else bytes/str).

    ``resampled=True``: every (rank, worker) draws shards with replacement from its own seed, an
    infinite stream (use it when shards are few or ranks many). ``resampled=False``: shards are
    shuffled with (seed, epoch), dealt disjointly to ranks then workers, and every rank yields
    exactly ``len(loader)`` = floor(samples / (batch_size * world_size)) batches (rounded down to
    a multiple of the workers); a rank whose shards run short re-reads its own shards, so no
    rank waits for another in a collective. Call again with the next ``epoch`` for a new order.
    ``draft_size`` lets JPEG decode at reduced scale (>= draft_size px), the decode hot path.
    """
    if batch_size <= 0 or world_size <= 0 or workers < 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size > 0, workers >= 0, 0 <= rank < world_size; got batch_size="
            f"{batch_size}, workers={workers}, rank={rank}, world_size={world_size}"
        )
    image_keys, extra_keys = tuple(image_keys), tuple(extra_keys)
    if clash := [k for k in extra_keys if k in _RESERVED]:
        raise ValueError(f"extra_keys {clash} clash with the batch keys {_RESERVED}")
    shard_urls = expand_urls(urls)
    counter = SkipCounter(shard_urls)
    nw = max(workers, 1)
    num_batches: int | None = None

    if resampled:
        source: list[Any] = [
            wds.ResampledShards(
                shard_urls,
                seed=seed,
                worker_seed=functools.partial(_worker_seed, seed, rank, epoch),
                deterministic=True,
            )
        ]
    else:
        if len(shard_urls) < world_size * nw:
            raise ValueError(
                f"epoch mode needs at least world_size * workers = {world_size} * {nw} = "
                f"{world_size * nw} shards, but {urls!r} has {len(shard_urls)}; use "
                "resampled=True, fewer workers, or write more (smaller) shards"
            )
        sizes = shard_sizes(shard_urls)
        order, plan = _epoch_plan(
            len(shard_urls), seed=seed, epoch=epoch, world_size=world_size, workers=nw
        )
        for r, per_worker in enumerate(plan):
            for w, shards in enumerate(per_worker):
                if sum(sizes[i] for i in shards) < batch_size:
                    raise ValueError(
                        f"epoch mode: rank {r} worker {w} gets shards with only "
                        f"{sum(sizes[i] for i in shards)} samples, less than one batch of "
                        f"{batch_size}; use fewer workers, smaller batches or resampled=True"
                    )
        per_worker_batches = sum(sizes) // (batch_size * world_size) // nw
        if per_worker_batches == 0:
            raise ValueError(
                f"epoch mode: {sum(sizes)} samples give no full batch of {batch_size} on each "
                f"of {world_size} ranks x {nw} workers"
            )
        num_batches = per_worker_batches * nw
        mine = [shard_urls[i] for i in order[rank::world_size]]
        source = [wds.SimpleShardList(mine), wds.split_by_worker]

    stages = [
        *source,
        wds.tarfile_to_samples(handler=counter.tar_handler),
        functools.partial(
            _seeded_shuffle, bufsize=shuffle_buffer, seed=seed, rank=rank, epoch=epoch
        )
        if shuffle_buffer > 1
        else None,
        wds.map(
            functools.partial(
                _decode_sample,
                preprocess=preprocess,
                image_keys=image_keys,
                text_key=text_key,
                extra_keys=extra_keys,
                draft_size=draft_size,
                counter=counter,
            ),
            handler=counter.sample_handler,
        ),
        wds.batched(
            batch_size,
            collation_fn=functools.partial(_collate, tokenizer=tokenizer, extra_keys=extra_keys),
            partial=False,
        ),
    ]
    pipeline = wds.DataPipeline(*stages)
    if num_batches is not None:
        # with_epoch caps each worker's iterator and restarts it if it runs dry.
        pipeline = pipeline.with_epoch(num_batches // nw)
    return TrainLoader(
        pipeline,
        skips=counter,
        num_batches=num_batches,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(derive_seed(seed, rank, epoch, 2)),
    )
