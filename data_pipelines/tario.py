"""Read samples out of a tar stream: members grouped by key, in file order, with their index.

A sample is the run of consecutive members sharing a key (the member path up to the first dot
of its basename, as webdataset and img2dataset define it); the member suffix after that dot,
lower-cased, names the field (``jpg``, ``txt``, ``json``, ``seg.png``). Members whose basename
starts with ``__`` or has no dot are not sample members. A key that repeats a suffix starts a
new sample (so a duplicated key yields two samples, which the validator reports). Reading is
streaming (``r|*``): no seeking, so it works on pipes and remote streams.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO


@dataclass
class RawSample:
    """One sample's undecoded members and where it came from."""

    key: str
    members: dict[str, bytes]
    url: str
    index: int
    """Position of the sample in its shard (0-based): the unit of the stream's resume offset."""


def _split(name: str) -> tuple[str, str] | None:
    folder, base = os.path.split(name)
    if base.startswith("__") or "." not in base:
        return None
    key, suffix = base.split(".", 1)
    return (f"{folder}/{key}" if folder else key), suffix.lower()


def iter_samples(stream: IO[bytes], url: str) -> Iterator[RawSample]:
    """Yield the samples of one tar stream in order.

    Raises whatever the tar reader raises on bad bytes (``tarfile.TarError``, ``EOFError``,
    ``OSError``): the samples before the damage have been yielded already.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    index = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            parts = _split(info.name)
            if parts is None:
                continue
            handle = tar.extractfile(info)
            data = handle.read() if handle is not None else b""
            if len(data) != info.size:
                raise EOFError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
            if parts[0] != key or parts[1] in members:
                if key is not None:
                    yield RawSample(key, members, url, index)
                    index += 1
                key, members = parts[0], {}
            members[parts[1]] = data
    if key is not None:
        yield RawSample(key, members, url, index)


def iter_keys(stream: IO[bytes]) -> Iterator[str]:
    """The sample keys of one tar stream, in order, without reading member data into memory
    (a start-up check that every sample has a sidecar entry reads only the headers' names)."""
    key: str | None = None
    suffixes: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            parts = _split(info.name) if info.isreg() else None
            if parts is None:
                continue
            if parts[0] != key or parts[1] in suffixes:
                if key is not None:
                    yield key
                key, suffixes = parts[0], set()
            suffixes.add(parts[1])
    if key is not None:
        yield key
