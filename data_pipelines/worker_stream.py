"""One canonical stream's infinite batch sequence: read, shuffle, decode, batch, with positions.

shard sequence (``stream_plan``) -> tar samples, a few shards at once in turn (``shard_reader``;
open and read errors are counted, the shard is left) -> seeded shuffle buffer on raw bytes (slot k of emission n is a
hash of (seed, stream, n)) -> decode (``decode``: data errors skipped and counted) ->
each image view transformed with torch's CPU generator seeded per sample and view (in the
trainer's own process, ``data.workers=0``, its state is put back after the sample), one
sentence drawn per sample where a text field asks (``batch_fields``) -> batch, tokenised once
per batch, JSON fields padded with masks.
Every batch carries the stream's position after it, from which :func:`worker_batches` resumes.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from data_pipelines.batch_fields import (
    BatchFields,
    JsonField,
    TextField,
    collate_arrays,
    collate_json,
    fallback_key,
)
from data_pipelines.decode import (
    SampleError,
    decode_caption,
    decode_for_transforms,
    decode_image,
    describe_data_error,
)
from data_pipelines.shard_reader import Ref, ShardReader
from data_pipelines.stream_plan import StreamId, StreamSpec, derive_seed, epoch_quota, stream_seed
from data_pipelines.tario import RawSample
from data_pipelines.text_sources import MissingText, TextSource
from vlp.config import redact_url

logger = logging.getLogger("data_pipelines.stream")

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class TooManyBadSamples(RuntimeError):
    """Too many samples were skipped as bad data (more than ``data.max_skip_fraction``, or a
    long run of consecutive failures): the data, not the code, is wrong, so the run stops with
    this one message (and the skip counts)."""


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
        url = redact_url(url)  # counts and reasons reach logs and data_skips_*.json
        self.consecutive += 1
        self.pending.by_shard[url] = self.pending.by_shard.get(url, 0) + 1
        self.pending.skipped += 1
        self.pending.reasons[url] = redact_url(describe_data_error(error))
        if self.pending.skipped <= 3:
            logger.warning("skipped data in %s: %s", url, self.pending.reasons[url])
        if self.consecutive >= self.limit:
            raise TooManyBadSamples(
                f"{self.consecutive} consecutive samples or shards failed, the last in {url}: "
                f"{self.pending.reasons[url]}; are the shards readable and data.image_keys / data.text_key right?"
            ) from error

    def take(self) -> dict[str, Any]:
        taken, self.pending = self.pending.to_json(), SkipCounts()
        return taken


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


def _read_text(raw: RawSample, sources: Sequence[TextSource], meta: Any) -> tuple[str, bool]:
    """The whole text of the first of ``sources`` that ``raw`` has (``meta``: its parsed json),
    decoded as every caption is, and whether it was not the first.

    Raises:
        MissingText: the sample has none of them (all named); ValueError: present, not text.
    """

    def member(key: str) -> str | None:
        return decode_caption(raw.members[key]) if key in raw.members else None

    missing = []
    for used_fallback, source in enumerate(sources):
        try:
            text = source.read(member, meta)
        except MissingText as absent:
            missing.append(str(absent))
            continue
        return decode_caption(text.encode("utf-8")), bool(used_fallback)
    raise MissingText(" and ".join(missing))


def _text(raw: RawSample, field: TextField, meta: Any) -> tuple[str, bool]:
    """The whole text of ``field`` (from its source, else its fallback), and whether it came
    from the fallback."""
    try:
        return _read_text(raw, field.sources, meta)
    except MissingText as absent:
        raise SampleError(f"text field '{field.name}': missing {absent}") from None
    except ValueError as error:
        raise SampleError(f"text field '{field.name}': {error}") from error


def sample_caption(raw: RawSample, source: str) -> str:
    """The caption of ``raw`` from ``source`` (a member suffix, ``data.text_key``, or
    ``json:<key>``, ``data.caption_field``: :func:`~data_pipelines.text_sources.caption_source`),
    read and decoded exactly as a training text field reads it: what the per-caption sidecars
    (`vlp prior weights`, `vlp protoclip teacher`) are computed from.

    Raises:
        SampleError: no such member or json key (``no member 'txt'``), a json that does not
            parse, or a value that is not text.
    """
    parsed = TextSource.parse(source)
    meta = _decode_extra("json", _member(raw, "json")) if parsed.json_key is not None else None
    try:
        return _read_text(raw, (parsed,), meta)[0]
    except MissingText as absent:
        raise SampleError(f"no {absent}") from None
    except ValueError as error:
        raise SampleError(str(error)) from error


def _json_value(field: JsonField, meta: Any) -> Any:
    if not isinstance(meta, dict) or field.source not in meta:
        raise SampleError(f"json key '{field.source}' (json field '{field.name}') is missing")
    value = meta[field.source]
    if not field.item:
        return value
    if not isinstance(value, list) or not all(
        isinstance(v, dict) and field.item in v for v in value
    ):
        raise SampleError(
            f"json key '{field.source}' (json field '{field.name}') is not a list of objects "
            f"that each have '{field.item}'"
        )
    return [v[field.item] for v in value]


def _array(data: bytes, member: str) -> torch.Tensor:
    """A ``.npy`` member as a float32 ``[n, d]`` tensor (no pickle: arrays of numbers only)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise SampleError(f"member '{member}' is not a .npy array of numbers: {error}") from error
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise SampleError(f"member '{member}' holds a {array.dtype} array of shape {array.shape}, not [n, d] numbers")  # fmt: skip
    return torch.from_numpy(array.astype(np.float32))


def _decode(spec: StreamSpec, raw: RawSample, fields: BatchFields, seed: int) -> dict[str, Any]:
    """One sample -> its views, chosen texts, json values and extras (``seed``: its stream seed).

    Only the views and the sentence choices draw randomness: view 0 from ``seed`` itself (as
    the single-view stream did), view i > 0 and text field i from seeds derived from it. The
    sentence seeds use Python's ``random``, not torch's generator, so they move no view.
    """
    try:
        image_key = next((k for k in spec.image_keys if k in raw.members), None)
        if image_key is None:
            raise SampleError(f"no image member (looked for {list(spec.image_keys)})")
        decode = decode_for_transforms if fields.views_take_arrays() else decode_image
        image: Any = decode(  # an array only when every view takes arrays
            raw.members[image_key], max_pixels=spec.max_pixels, draft_size=spec.draft_size
        )
        meta = None
        if fields.required_json_keys():
            meta = _decode_extra("json", _member(raw, "json"))
        texts: dict[str, Any] = {}
        for i, t in enumerate(fields.texts):
            text, used_fallback = _text(raw, t, meta)
            texts[t.name] = t.pick(text, derive_seed(seed, 29, i))
            if t.fallback:
                texts[fallback_key(t.name)] = used_fallback
        values = {j.name: _json_value(j, meta) for j in fields.json}
        values |= {a.name: _array(_member(raw, a.member), a.member) for a in fields.arrays}
        values |= {c.name: c.lookup(raw.key) for c in fields.sidecars}
        extras = {k: _decode_extra(k, _member(raw, k)) for k in spec.extra_keys}
    except SampleError as error:
        raise SampleError(f"shard {raw.url} sample {raw.key}: {error}", raw.url, raw.key) from error
    sample: dict[str, Any] = {"__key__": raw.key}
    # Without DataLoader workers (data.workers=0) this runs in the trainer's process, whose CPU
    # generator draws the dropout masks: the sample's seeding must leave it where it was. A
    # worker's generator is its own, so nothing is saved there.
    trainer_state = torch.default_generator.get_state() if get_worker_info() is None else None
    try:
        for i, view in enumerate(fields.views):
            # Augmentations are a function of the sample's place in the stream. The CPU
            # generator alone: torch.manual_seed also queues CUDA seeding, ~1 ms per sample on
            # a CUDA build. The transforms draw from the default generator (torchvision's v2
            # ops take no generator), so it is seeded here and put back after.
            torch.default_generator.manual_seed(seed if i == 0 else derive_seed(seed, 19, i))
            sample[view.name] = view.transform(image)
    finally:
        if trainer_state is not None:
            torch.default_generator.set_state(trainer_state)
    return {**sample, **texts, **values, **extras}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; inside a DataLoader worker straight into shared memory (as torch's own
    collate does), so that the batch reaches the main process without a second copy: stacked
    in private memory, every batch was copied into shared memory again when it was sent,
    faulting in two fresh buffers per batch (78 page faults per 224 px sample against 13 in one
    process, benchmarks/RESULTS.md "Data stream")."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    shared = torch.UntypedStorage._new_shared(len(tensors) * first.nbytes)
    out = torch.empty(0, dtype=first.dtype).set_(shared).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def _collate(
    samples: list[dict[str, Any]], fields: BatchFields, extra_keys: tuple[str, ...]
) -> dict[str, Any]:
    batch: dict[str, Any] = {v.name: _stack([s[v.name] for s in samples]) for v in fields.views}
    for text in fields.texts:
        batch[text.name] = text.tokenizer([s[text.name] for s in samples])
        if text.fallback:
            key = fallback_key(text.name)
            batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.bool)
    batch["__key__"] = [s["__key__"] for s in samples]
    for value in fields.json:
        batch.update(collate_json(value.name, [s[value.name] for s in samples]))
    for array in fields.arrays:
        batch.update(collate_arrays(array.name, [s[array.name] for s in samples]))
    for sidecar in fields.sidecars:
        batch[sidecar.name] = torch.stack([s[sidecar.name] for s in samples])
    for k in extra_keys:
        values = [s[k] for s in samples]
        if all(isinstance(v, int) for v in values):
            batch[k] = torch.tensor(values, dtype=torch.long)
        else:
            batch[k] = values
    return batch


def _start(spec: StreamSpec) -> dict[str, Any]:
    return {"epoch": spec.first_epoch, "batches": 0, "open": [], "next_shard": 0,
            "emitted": 0, "buffer": []}  # fmt: skip


def worker_batches(
    spec: StreamSpec,
    stream: StreamId,
    start: dict[str, Any] | None,
    fields: BatchFields,
) -> Iterator[dict[str, Any]]:
    """Canonical stream ``stream``'s infinite batch sequence, from a saved position or the
    start.

    Each batch has ``__stream__ = {"stream", "position", "counts"}``: the stream's number, the
    position after the batch and the skips since the previous one. In epoch mode the stream
    yields exactly ``epoch_quota`` batches per epoch from its own shards of that epoch: the shuffle buffer is
    drained at the end of its shards, and what is left when the quota is reached (buffered,
    unread, half a batch) is dropped; then the next epoch starts with an empty buffer.
    """
    counts = _WorkerCounts(spec.max_consecutive_errors)
    position = start or _start(spec)
    epoch, batches = int(position["epoch"]), int(position["batches"])
    quota = None if spec.resampled else epoch_quota(spec, epoch)
    reader = ShardReader(spec, stream, epoch, position, counts)
    refs: list[Ref] = [(int(e), int(i), int(j)) for e, i, j in position["buffer"]]
    buffer = reader.restore(refs)
    emitted = int(position["emitted"])
    pending: list[dict[str, Any]] = []
    rereading = False
    while True:
        item = reader.next(drained=not buffer)
        if item is not None and not rereading and item[0][1] >= (reader.per_pass or item[0][1] + 1):
            rereading = True
            logger.warning(
                "rank %d stream %d: skipped samples left it short of %s batches in epoch %d; it "
                "re-reads its own shards of the epoch (some samples repeat)",
                spec.rank, spec.number(stream), quota, epoch,
            )  # fmt: skip
        if item is None:  # this pass over the epoch's shards is read: drain the buffer
            slot = stream_seed(spec, stream, emitted, 13) % len(buffer)
            _, out = buffer.pop(slot)
        elif spec.shuffle_buffer > 1:
            if len(buffer) < spec.shuffle_buffer:
                buffer.append(item)
                continue
            slot = stream_seed(spec, stream, emitted, 13) % spec.shuffle_buffer
            (_, out), buffer[slot] = buffer[slot], item
        else:
            out = item[1]
        emitted += 1
        try:
            salt = (spec.view_salt,) if spec.view_salt else ()  # 0: the seeds of every run
            sample_seed = stream_seed(spec, stream, emitted, 17, *salt)
            pending.append(_decode(spec, out, fields, sample_seed))
            counts.ok()
        except SampleError as error:
            counts.skip(out.url, error)
            continue
        if len(pending) < spec.batch_size:
            continue
        batch = _collate(pending, fields, spec.extra_keys)
        pending, batches = [], batches + 1
        if quota is not None and batches == quota:  # the epoch is over: drop what is left
            reader.close()
            epoch, batches, buffer, rereading = epoch + 1, 0, [], False
            quota = epoch_quota(spec, epoch)
            reader = ShardReader(spec, stream, epoch, _start(spec), counts)
        batch["__stream__"] = {
            "stream": spec.number(stream),
            "position": {
                "epoch": epoch,
                "batches": batches,
                **reader.state(),
                "emitted": emitted,
                "buffer": [list(r) for r, _ in buffer],
            },
            "counts": counts.take(),
        }
        yield batch
