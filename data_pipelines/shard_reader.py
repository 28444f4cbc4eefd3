"""One canonical stream's raw samples: several shards open at once, a sample from each in turn.

Reading one shard at a time puts a shard's samples side by side in the shuffle buffer; shards
written in class order (one class per shard) then give batches of one or two classes. Keeping
``shards_in_flight`` shards open and taking a sample from each in turn (round-robin) puts that
many shards into every stretch of the stream at the cost of that many open streams (a read
buffer and the tar member being read each). The reader's state is plain data (the open shards
with their next sample, and the next shard to open), so a resume reopens the open shards and
skips to their samples, reading tar bytes and decoding nothing.

Epoch mode reads in *passes* over the worker's shards of the epoch: no shard of the next pass
is opened before every shard of this one is finished and the caller has drained its shuffle
buffer (:meth:`ShardReader.next` returns None at that point), so epochs never mix.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Protocol

import webdataset as wds

from data_pipelines.decode import DATA_ERRORS, SampleError
from data_pipelines.stream_plan import StreamId, StreamSpec, WorkerShards
from data_pipelines.tario import RawSample, iter_samples

Ref = tuple[int, int, int]  # (epoch, shard index in the worker's sequence, sample index in shard)


class Counts(Protocol):
    """Where read errors go (the worker's skip counter)."""

    def skip(self, url: str, error: BaseException) -> None: ...


def _samples(url: str, first: int) -> Iterator[RawSample]:
    """A shard's samples from index ``first`` on (earlier ones are read past, not decoded)."""
    with wds.gopen(url) as stream:
        for raw in iter_samples(stream, url):
            if raw.index >= first:
                yield raw


class _Damaged(Iterator[RawSample]):
    """A shard's remaining samples when reading on meets ``error``: the next read raises it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __next__(self) -> RawSample:
        raise self.error


class ShardReader:
    """Round-robin over up to ``spec.shards_in_flight`` open shards of one stream's sequence."""

    def __init__(
        self, spec: StreamSpec, stream: StreamId, epoch: int, state: dict[str, Any], counts: Counts
    ) -> None:
        self.spec, self.stream, self.epoch, self.counts = spec, stream, epoch, counts
        self.open: list[list[int]] = [[int(i), int(j)] for i, j in state["open"]]
        """[shard index, next sample index] per open shard, the next to read from first."""
        self.next_shard = int(state["next_shard"])
        self.shards = WorkerShards(spec, stream, epoch)
        self.per_pass = self.shards.per_pass
        self._iters: dict[int, Iterator[RawSample]] = {}
        self._urls: dict[int, str] = {}
        """The open shards' URLs, resolved once per shard opened."""

    def state(self) -> dict[str, Any]:
        """The reader's position (JSON-ready)."""
        return {"open": [list(o) for o in self.open], "next_shard": self.next_shard}

    def url(self, shard: int) -> str:
        """URL of shard ``shard`` of this stream's sequence in this epoch."""
        url = self._urls.get(shard)
        if url is None:
            url = self._urls[shard] = self.shards.url(shard)
        return url

    def close(self) -> None:
        """Close the open shard streams."""
        for it in self._iters.values():
            getattr(it, "close", lambda: None)()
        self._iters.clear()

    def _may_open(self, drained: bool) -> bool:
        if self.per_pass is None or self.next_shard % self.per_pass:
            return True
        # A pass boundary: the next pass starts once this one is read and the buffer drained.
        return self.next_shard == 0 or (not self.open and drained)

    def next(self, drained: bool) -> tuple[Ref, RawSample] | None:
        """The next raw sample and its reference; None at the end of an epoch-mode pass (all its
        shards read) while the caller's buffer is not ``drained``."""
        while True:
            while len(self.open) < self.spec.shards_in_flight and self._may_open(drained):
                self.open.append([self.next_shard, 0])
                self.next_shard += 1
            if not self.open:
                return None
            shard, first = self.open[0]
            url = self.url(shard)
            it = self._iters.get(shard)
            if it is None:
                it = self._iters[shard] = _samples(url, first)
            try:
                raw = next(it)
            except StopIteration:
                if first == 0:
                    self.counts.skip(url, SampleError(f"shard {url} has no samples"))
                self._finish(shard)
                continue
            except DATA_ERRORS as error:
                self.counts.skip(url, error)
                self._finish(shard)
                continue
            self.open.pop(0)
            self.open.append([shard, raw.index + 1])
            return (self.epoch, shard, raw.index), raw

    def _finish(self, shard: int) -> None:
        self.open.pop(0)
        self._urls.pop(shard, None)
        it = self._iters.pop(shard, None)
        getattr(it, "close", lambda: None)()

    def restore(self, refs: list[Ref]) -> list[tuple[Ref, RawSample]]:
        """Re-read the samples a saved shuffle buffer held (in buffer order), reading each shard
        once: an open shard's stream is then left at its next sample for :meth:`next`."""
        wanted: dict[int, set[int]] = {}
        for _, shard, sample in refs:
            wanted.setdefault(shard, set()).add(sample)
        resume_at = dict((shard, first) for shard, first in self.open)
        found: dict[Ref, RawSample] = {}
        for shard in sorted(set(wanted) | set(resume_at)):
            samples = wanted.get(shard, set())
            stop = max(samples | {resume_at.get(shard, -1)})
            it = _samples(self.shards.url(shard), 0)
            try:
                for raw in it:
                    if raw.index in samples:
                        found[(self.epoch, shard, raw.index)] = raw
                    if shard in resume_at and raw.index >= resume_at[shard]:
                        self._iters[shard] = itertools.chain([raw], it)
                        break
                    if raw.index >= stop:
                        break
                else:
                    if shard in resume_at:  # read to its end: nothing left to read in it
                        self._iters[shard] = iter(())
            except DATA_ERRORS as error:
                # Damage past the samples read so far: the uninterrupted stream meets it at its
                # next read of this shard, and skips and counts it there; so does this one.
                if shard in resume_at:
                    self._iters[shard] = _Damaged(error)
        missing = [ref for ref in refs if ref not in found]
        if missing:
            raise RuntimeError(
                f"cannot restore the stream position: {len(missing)} buffered samples are no "
                f"longer in their shards (e.g. {missing[0]} of {self.url(missing[0][1])}); were "
                "the shards rewritten?"
            )
        return [(ref, found[ref]) for ref in refs]
