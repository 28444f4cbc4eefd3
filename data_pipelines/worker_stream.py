"""One logical worker's infinite batch sequence: read, shuffle, decode, batch, with positions.

shard sequence (``stream_plan``) -> tar samples in file order (``tario``; open and read errors
are counted, the shard is left) -> seeded shuffle buffer on raw bytes (slot k of emission n is a
hash of (seed, rank, w, n)) -> decode (``decode``: data errors skipped and counted) ->
transform with torch's CPU generator seeded per sample -> batch, tokenised once per batch.
Every batch carries the worker's position after it, from which :func:`worker_batches` resumes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from data_pipelines.decode import DATA_ERRORS, SampleError, decode_caption, decode_image
from data_pipelines.stream_plan import StreamSpec, derive_seed, shard_url
from data_pipelines.tario import RawSample, iter_samples

logger = logging.getLogger("data_pipelines.stream")

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
Ref = tuple[int, int, int]  # (epoch, shard index in the worker's sequence, sample index in shard)


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
        url = shard_url(spec, worker, epoch, shard)
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
        url = shard_url(spec, worker, epoch, shard)
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
