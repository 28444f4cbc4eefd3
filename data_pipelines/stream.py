"""The training stream: shards -> batches, deterministic, resumable exactly, never hanging.

Each DataLoader worker plays one *logical worker* w of this rank and produces an infinite
sequence of batches that is a pure function of (seed, config, rank, world size, workers, w):

shard sequence (resampled: draw i picks a shard with the sources' weights from its own seed;
epoch mode: epoch e's seeded shuffle of all shards, dealt disjointly to ranks, then workers)
-> tar samples in file order (``tario``; open and read errors are counted, the shard is left)
-> seeded shuffle buffer on raw bytes (slot k of emission n is a hash of (seed, rank, w, n))
-> decode (``decode``: data errors skipped and counted) -> transform with torch's RNG seeded per
sample -> batch, tokenised once per batch.

Every batch carries its worker's position after it: (epoch, shard, sample) of the next tar sample
to read, the emission count, and the references (epoch, shard, sample) of the samples in the
shuffle buffer. The main process keeps the position of the last CONSUMED batch of every worker
(prefetched batches are not consumed) and which worker comes next; that is the stream's
``state_dict``. A resumed stream re-reads only the shards that hold the buffered samples and the
current shard, skipping tar members without decoding images, and rotates the workers so that the
next batch comes from the right one. DataLoader hands out batches round-robin over workers, and
every worker is infinite, so the order is fixed.

Never hang: epoch mode with fewer shards than ranks × workers fails at construction; a worker
whose samples all fail stops after ``max_consecutive_errors``; a dead worker is reported by the
DataLoader within seconds; a remote shard that stalls raises ``RemoteShardError``
(``remote``); and the DataLoader's ``timeout`` bounds the wait for any batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.decode import (
    DATA_ERRORS,
    DEFAULT_MAX_PIXELS,
    SampleError,
    decode_caption,
    decode_image,
)
from data_pipelines.remote import register_remote_openers
from data_pipelines.shards import Urls, count_samples, expand_urls, shard_sizes, split_sources
from data_pipelines.tario import RawSample, iter_samples

__all__ = [
    "SkipCounts",
    "StreamSpec",
    "TrainStream",
    "count_samples",
    "derive_seed",
    "expand_urls",
    "make_train_stream",
    "shard_sizes",
]

logger = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
Ref = tuple[int, int, int]  # (epoch, shard index in the worker's sequence, sample index in shard)
_RESERVED = ("image", "text", "__key__", "__stream__")
_STATE_VERSION = 1


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
def _epoch_plan(spec: StreamSpec, epoch: int) -> list[list[list[int]]]:
    """plan[rank][worker] = this epoch's shard indices: a seeded shuffle dealt to ranks, then
    to workers, so that shards are disjoint across every (rank, worker) within an epoch."""
    order = list(range(len(spec.urls)))
    random.Random(derive_seed(spec.seed, epoch)).shuffle(order)
    return [
        [order[r :: spec.world_size][w :: spec.workers] for w in range(spec.workers)]
        for r in range(spec.world_size)
    ]


def _shard_url(spec: StreamSpec, worker: int, epoch: int, index: int) -> str | None:
    """URL of shard ``index`` of ``worker`` in ``epoch`` (None: the epoch is over)."""
    if spec.resampled:  # each draw from its own seed: a resume needs no replay of earlier draws
        draw = random.Random(derive_seed(spec.seed, spec.rank, worker, index, 11))
        return draw.choices(spec.urls, weights=spec.weights)[0]
    mine = _epoch_plan(spec, epoch)[spec.rank][worker]
    return spec.urls[mine[index]] if index < len(mine) else None


@dataclass
class SkipCounts:
    """What a stream skipped, per shard, next to what it used."""

    ok: int = 0
    skipped: int = 0
    by_shard: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    """The last reason per shard, for the messages."""

    def add(self, other: dict[str, Any]) -> None:
        """Add a worker's counts (``ok``, ``by_shard``, ``reasons``) to these."""
        self.ok += int(other["ok"])
        for url, n in other["by_shard"].items():
            self.by_shard[url] = self.by_shard.get(url, 0) + int(n)
            self.skipped += int(n)
        self.reasons.update(other["reasons"])

    @property
    def total(self) -> int:
        """Samples (or unreadable shards) skipped."""
        return self.skipped

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "ok": self.ok,
            "skipped": self.skipped,
            "by_shard": dict(self.by_shard),
            "reasons": dict(self.reasons),
        }


class _WorkerCounts:
    """A worker's skips since its last batch, and the guard against a stream of failures."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.consecutive = 0
        self.pending = SkipCounts()

    def ok(self) -> None:
        self.consecutive = 0
        self.pending.ok += 1

    def skip(self, url: str, error: BaseException) -> None:
        self.consecutive += 1
        self.pending.by_shard[url] = self.pending.by_shard.get(url, 0) + 1
        self.pending.skipped += 1
        self.pending.reasons[url] = repr(error)
        if self.pending.skipped <= 3:
            logger.warning("skipped data in %s: %r", url, error)
        if self.consecutive >= self.limit:
            raise RuntimeError(
                f"{self.consecutive} consecutive samples or shards failed, the last in {url}: "
                f"{error!r}; are the shards readable and data.image_keys / data.text_key right?"
            ) from error

    def take(self) -> dict[str, Any]:
        taken, self.pending = self.pending.to_json(), SkipCounts()
        return taken


def _read(
    spec: StreamSpec, worker: int, start: Ref, counts: _WorkerCounts
) -> Iterator[tuple[Ref, RawSample]]:
    """Raw samples from position ``start`` on, forever (epochs follow one another)."""
    epoch, shard, first = start
    while True:
        url = _shard_url(spec, worker, epoch, shard)
        if url is None:
            epoch, shard, first = epoch + 1, 0, 0
            continue
        yielded = False
        try:
            with wds.gopen(url) as stream:
                for raw in iter_samples(stream, url):
                    if raw.index >= first:  # skipping reads tar bytes, decodes nothing
                        yielded = True
                        yield (epoch, shard, raw.index), raw
        except DATA_ERRORS as error:
            counts.skip(url, error)
        else:
            if not yielded and first == 0:
                counts.skip(url, SampleError(f"shard {url} has no samples"))
        shard, first = shard + 1, 0


def _restore_buffer(
    spec: StreamSpec, refs: list[Ref], counts: _WorkerCounts, worker: int
) -> list[tuple[Ref, RawSample]]:
    """Re-read the samples a saved shuffle buffer held, in their buffer order."""
    wanted: dict[tuple[int, int], set[int]] = {}
    for epoch, shard, sample in refs:
        wanted.setdefault((epoch, shard), set()).add(sample)
    found: dict[Ref, RawSample] = {}
    for (epoch, shard), samples in sorted(wanted.items()):
        url = _shard_url(spec, worker, epoch, shard)
        if url is None:
            raise RuntimeError(f"cannot restore the stream: no shard {shard} in epoch {epoch}")
        with wds.gopen(url) as stream:
            for raw in iter_samples(stream, url):
                if raw.index in samples:
                    found[(epoch, shard, raw.index)] = raw
                if raw.index >= max(samples):
                    break
    missing = [ref for ref in refs if ref not in found]
    if missing:
        raise RuntimeError(
            f"cannot restore the stream position: {len(missing)} buffered samples are no longer "
            f"in their shards (e.g. {missing[0]}); were the shards rewritten?"
        )
    return [(ref, found[ref]) for ref in refs]


def _member(raw: RawSample, key: str) -> bytes:
    if key not in raw.members:
        raise SampleError(f"missing member '{key}' (has {sorted(raw.members)})")
    return raw.members[key]


def _decode_extra(suffix: str, data: bytes) -> Any:
    try:
        if suffix.endswith("json"):
            return json.loads(data)
        if suffix in ("cls", "cls2", "index", "id"):
            return int(data)
        if suffix.endswith(("txt", "text")):
            return data.decode("utf-8")
    except (ValueError, UnicodeDecodeError) as error:
        raise SampleError(f"member '{suffix}' does not decode: {error}") from error
    return data


def _caption(spec: StreamSpec, raw: RawSample) -> str:
    if spec.caption_field is None:
        return decode_caption(_member(raw, spec.text_key))
    meta = _decode_extra("json", _member(raw, "json"))
    value = meta.get(spec.caption_field) if isinstance(meta, dict) else None
    if not isinstance(value, str):
        raise SampleError(f"json field '{spec.caption_field}' is missing or not text")
    return decode_caption(value.encode("utf-8"))


def _decode(spec: StreamSpec, raw: RawSample, preprocess: Preprocess, seed: int) -> dict[str, Any]:
    try:
        image_key = next((k for k in spec.image_keys if k in raw.members), None)
        if image_key is None:
            raise SampleError(f"no image member (looked for {list(spec.image_keys)})")
        image = decode_image(
            raw.members[image_key], max_pixels=spec.max_pixels, draft_size=spec.draft_size
        )
        text = _caption(spec, raw)
        extras = {k: _decode_extra(k, _member(raw, k)) for k in spec.extra_keys}
    except SampleError as error:
        raise SampleError(f"shard {raw.url} sample {raw.key}: {error}", raw.url, raw.key) from error
    # Augmentations are a function of the sample's place in the stream. The CPU generator
    # alone: torch.manual_seed also queues CUDA seeding, ~1 ms per sample on a CUDA build.
    torch.default_generator.manual_seed(seed)
    return {"__key__": raw.key, "image": preprocess(image), "text": text, **extras}


def _collate(
    samples: list[dict[str, Any]], tokenizer: Tokenizer, extra_keys: tuple[str, ...]
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
        else:
            batch[k] = values
    return batch


def worker_batches(
    spec: StreamSpec,
    worker: int,
    start: dict[str, Any] | None,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
) -> Iterator[dict[str, Any]]:
    """Logical worker ``worker``'s infinite batch sequence, from a saved position or the start.

    Each batch has ``__stream__ = {"worker", "position", "counts"}``: the position after it and
    the skips since the previous batch.
    """
    counts = _WorkerCounts(spec.max_consecutive_errors)
    position = start or {"next": [spec.first_epoch, 0, 0], "emitted": 0, "buffer": []}
    refs: list[Ref] = [(int(e), int(i), int(j)) for e, i, j in position["buffer"]]
    buffer = _restore_buffer(spec, refs, counts, worker) if refs else []
    emitted = int(position["emitted"])
    pending: list[dict[str, Any]] = []
    epoch, shard, sample = (int(v) for v in position["next"])
    for ref, raw in _read(spec, worker, (epoch, shard, sample), counts):
        if spec.shuffle_buffer > 1:
            if len(buffer) < spec.shuffle_buffer:
                buffer.append((ref, raw))
                continue
            slot = derive_seed(spec.seed, spec.rank, worker, emitted, 13) % spec.shuffle_buffer
            (_, out), buffer[slot] = buffer[slot], (ref, raw)
        else:
            out = raw
        emitted += 1
        try:
            sample_seed = derive_seed(spec.seed, spec.rank, worker, emitted, 17)
            pending.append(_decode(spec, out, preprocess, sample_seed))
            counts.ok()
        except SampleError as error:
            counts.skip(out.url, error)
            continue
        if len(pending) == spec.batch_size:
            batch = _collate(pending, tokenizer, spec.extra_keys)
            batch["__stream__"] = {
                "worker": worker,
                "position": {
                    "next": [ref[0], ref[1], ref[2] + 1],
                    "emitted": emitted,
                    "buffer": [list(r) for r, _ in buffer],
                },
                "counts": counts.take(),
            }
            pending = []
            yield batch


class _WorkerDataset(IterableDataset):
    """What each DataLoader worker iterates: its logical worker's batches."""

    def __init__(
        self,
        spec: StreamSpec,
        starts: dict[int, dict[str, Any]],
        first_worker: int,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
    ) -> None:
        self.spec, self.starts, self.first_worker = spec, starts, first_worker
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        worker = (physical + self.first_worker) % self.spec.workers
        # Workers started with "spawn" import webdataset afresh: route remote schemes again.
        register_remote_openers(self.spec.remote_timeout, self.spec.remote_retries)
        return worker_batches(
            self.spec, worker, self.starts.get(worker), self.preprocess, self.tokenizer
        )


def _as_is(batch: Any) -> Any:
    """The DataLoader's collate for ready-made batches (its default walks every list element
    of the position record: ~0.2 ms per sample)."""
    return batch


class TrainStream:
    """This rank's training batches, with ``state_dict``/``load_state_dict`` for exact resume.

    Iterating yields batch dicts ``{"image", "text", "__key__", **extra}``: forever in resampled
    mode; ``len(stream)`` batches per ``iter()`` in epoch mode (iterate again for the next
    epoch; every rank yields the same count). ``skips`` holds what was skipped, per shard.
    """

    def __init__(
        self,
        spec: StreamSpec,
        *,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        num_workers: int,
        prefetch_factor: int,
        timeout: float,
        max_skip_fraction: float,
        num_batches: int | None,
    ) -> None:
        self.spec = spec
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.num_workers, self.prefetch_factor, self.timeout = num_workers, prefetch_factor, timeout
        self.max_skip_fraction = max_skip_fraction
        self.num_batches = num_batches
        self.skips = SkipCounts()
        self._positions: dict[int, dict[str, Any]] = {}
        self._next_worker = 0
        self._consumed = 0

    @property
    def dataset(self) -> _WorkerDataset:
        """The IterableDataset the DataLoader runs (picklable, for the spawn start method)."""
        return _WorkerDataset(
            self.spec, dict(self._positions), self._next_worker, self.preprocess, self.tokenizer
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank; a ``TypeError`` for the infinite resampled stream."""
        if self.num_batches is None:
            raise TypeError("a resampled stream is infinite and has no len()")
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            timeout=self.timeout if self.num_workers else 0,
            persistent_workers=False,
            collate_fn=_as_is,
        )
        remaining = None if self.num_batches is None else self.num_batches - self._consumed
        if remaining is not None and remaining <= 0:
            self._consumed, remaining = 0, self.num_batches
        batches = iter(loader)
        try:
            for batch in batches:
                meta = batch.pop("__stream__")
                self._positions[meta["worker"]] = meta["position"]
                self._next_worker = (meta["worker"] + 1) % self.spec.workers
                self.skips.add(meta["counts"])
                self._check_skips()
                self._consumed += 1
                yield batch
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        self._consumed = 0
                        return
        except (ConnectionError, EOFError) as error:
            if not self.num_workers:
                raise
            # A worker that dies while its batch is being received shows up as a broken pipe
            # before the DataLoader's own "exited unexpectedly" check runs.
            raise RuntimeError(
                f"a DataLoader worker of rank {self.spec.rank} exited unexpectedly (receiving "
                f"its batch failed: {error!r}); its own log lines above say why"
            ) from error
        finally:
            del batches  # shuts the workers down now, so no late SIGCHLD error escapes

    def _check_skips(self) -> None:
        seen = self.skips.ok + self.skips.skipped
        if seen < 10 * self.spec.batch_size or self.skips.skipped <= self.max_skip_fraction * seen:
            return
        worst = sorted(self.skips.by_shard.items(), key=lambda item: -item[1])[:3]
        raise RuntimeError(
            f"{self.skips.skipped} of {seen} samples skipped "
            f"({self.skips.skipped / seen:.1%} > data.max_skip_fraction="
            f"{self.max_skip_fraction}); worst shards: "
            + "; ".join(f"{url} ({n}: {self.skips.reasons.get(url, '')})" for url, n in worst)
        )

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (JSON-ready)."""
        return {
            "version": _STATE_VERSION,
            "fingerprint": self.spec.fingerprint(),
            "world_size": self.spec.world_size,
            "workers": self.spec.workers,
            "rank": self.spec.rank,
            "next_worker": self._next_worker,
            "consumed_in_epoch": self._consumed,
            "positions": {str(w): p for w, p in self._positions.items()},
            "skips": self.skips.to_json(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a stream with the same configuration.

        Raises:
            ValueError: the state comes from another world size, worker count, rank or
                stream configuration (shards, batch size, seed, shuffle, keys, ...).
        """
        for key, mine in (
            ("world_size", self.spec.world_size),
            ("workers", self.spec.workers),
            ("rank", self.spec.rank),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"the saved data position was written with {key}={state.get(key)}, this run "
                    f"has {key}={mine}: resume with the same processes and data.workers"
                )
        if state.get("version") != _STATE_VERSION or state.get("fingerprint") != (
            self.spec.fingerprint()
        ):
            raise ValueError(
                "the saved data position belongs to another stream configuration (shards, "
                "batch size, seed, shuffle buffer or keys changed); resume with the same data "
                "config"
            )
        self._positions = {int(w): p for w, p in state["positions"].items()}
        self._next_worker = int(state["next_worker"])
        self._consumed = int(state["consumed_in_epoch"])
        self.skips = SkipCounts()
        self.skips.add({k: state["skips"][k] for k in ("ok", "by_shard", "reasons")})


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
    weights: Sequence[float] | None = None,
    image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
    text_key: str = "txt",
    caption_field: str | None = None,
    extra_keys: Sequence[str] = (),
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefetch_factor: int = 2,
    timeout: float = 600.0,
    max_skip_fraction: float = 0.1,
    max_consecutive_errors: int = 200,
    remote_timeout: float = 60.0,
    remote_retries: int = 3,
) -> TrainStream:
    """Build this rank's training stream (see the module docstring for what it guarantees).

    Args:
        urls: shards: a folder, brace pattern, fsspec URL, or several sources joined with
            ``::`` (or a list of them).
        weights: one per source (open_clip's upsampling factors); resampled mode only.
        resampled: draw shards with replacement (infinite); False: epochs over disjoint shards
            (``len()`` = floor(samples / (batch_size · world_size)) batches per epoch, rounded
            down to a multiple of the workers).
        caption_field: take the caption from this field of the sample's ``json`` instead of
            ``text_key``.
        extra_keys: more members to return (json -> dict, cls -> LongTensor, txt -> str).
        draft_size: let JPEGs decode at reduced scale with both sides >= draft_size.
        timeout: seconds the DataLoader waits for one batch before it raises.
        max_skip_fraction: skipped / seen above this (after 10 batches' worth) stops the run.
        max_consecutive_errors: failed samples or shards in a row before a worker gives up.
        remote_timeout, remote_retries: per-read timeout and re-opens of remote shards
            (:mod:`data_pipelines.remote`).
    """
    if batch_size <= 0 or world_size <= 0 or workers < 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size > 0, workers >= 0, 0 <= rank < world_size; got batch_size="
            f"{batch_size}, workers={workers}, rank={rank}, world_size={world_size}"
        )
    extra_keys = tuple(extra_keys)
    if clash := [k for k in extra_keys if k in _RESERVED]:
        raise ValueError(f"extra_keys {clash} clash with the batch keys {_RESERVED}")
    register_remote_openers(remote_timeout, remote_retries)
    shard_urls, shard_weights = split_sources(urls, weights)
    if not resampled and len(set(shard_weights)) > 1:
        raise ValueError("data.train_weights need resampled=True (epoch mode reads every shard)")
    nw = max(workers, 1)
    spec = StreamSpec(
        urls=tuple(shard_urls),
        weights=tuple(shard_weights),
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=nw,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        first_epoch=epoch,
        image_keys=tuple(image_keys),
        text_key=text_key,
        caption_field=caption_field,
        extra_keys=extra_keys,
        draft_size=draft_size,
        max_pixels=max_pixels,
        max_consecutive_errors=max_consecutive_errors,
        remote_timeout=remote_timeout,
        remote_retries=remote_retries,
    )
    num_batches = None if resampled else _epoch_batches(spec)
    return TrainStream(
        spec,
        preprocess=preprocess,
        tokenizer=tokenizer,
        num_workers=workers,
        prefetch_factor=prefetch_factor,
        timeout=timeout,
        max_skip_fraction=max_skip_fraction,
        num_batches=num_batches,
    )


def _epoch_batches(spec: StreamSpec) -> int:
    """Batches per epoch per rank in epoch mode; refuses plans that would leave a worker idle."""
    n = len(spec.urls)
    if n < spec.world_size * spec.workers:
        raise ValueError(
            f"epoch mode needs at least world_size * workers = {spec.world_size} * "
            f"{spec.workers} = {spec.world_size * spec.workers} shards, but the stream has "
            f"{n}; use resampled=True, fewer workers, or write more (smaller) shards"
        )
    sizes = shard_sizes(list(spec.urls))
    for r, per_worker in enumerate(_epoch_plan(spec, spec.first_epoch)):
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
