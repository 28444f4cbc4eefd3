"""Read samples out of a tar stream: members grouped by key, in file order, with their index.

A sample is the run of consecutive members sharing a key (the member path up to the first dot
of its basename, as webdataset and img2dataset define it); the member suffix after that dot,
lower-cased, names the field (``jpg``, ``txt``, ``json``, ``seg.png``). Members whose basename
starts with ``__`` or has no dot are not sample members. A key that repeats a suffix starts a
new sample (so a duplicated key yields two samples, which the validator reports). Reading is
streaming: no seeking, so it works on pipes and remote streams.

The headers are parsed here, not by Python's ``tarfile``, which builds a ``TarInfo`` object
per member (and a dict and regex pass per pax extended header, which webdataset writers and
img2dataset emit before every member when given a float mtime): in a data worker that cost
more than cropping a 512x384 image (``benchmarks/data_throughput.py --profile``). The parser
reads ustar, GNU and pax tars the way ``tarfile``'s ``r|*`` mode does (GNU long names, pax
``path`` and ``size`` records; pax global headers skipped; non-regular members skipped; the
first zero block ends the archive). Unlike ``tarfile``, the archive must end with that zero
block: ``tarfile`` ends quietly where the data stops at a member boundary, or at a header that
is cut short or fails its checksum after the first member, which hid a shard cut between two
members (or a damaged header) from the training stream, its samples after the cut silently
gone. Here a missing end raises :class:`ArchiveCut` (an ``EOFError``) and a damaged header
:class:`DamagedHeader` (a ``tarfile.ReadError``), both naming the last member read, after the
same samples ``tarfile`` gives (the members before them are whole): the stream skips and counts
the rest of the shard as it does for a cut inside a member. Both are in
``data_pipelines.decode.DATA_ERRORS``. Compressed tars (gzip, bzip2, xz: the magic ``r|*``
detects) go to ``tarfile``, whose decompressor reports a cut itself.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = frozenset((b"0", b"\0", b"7", b"S"))
"""``tarfile.REGULAR_TYPES``: members with data that ``isreg()`` calls files."""
_NO_DATA = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))
"""Links, devices, directories, fifos: ``tarfile`` reads no data blocks after these headers
(every other unknown type is skipped like a file, by its size)."""
_GNU_TYPES = frozenset((b"L", b"K", b"S"))
_PAX_TYPES = frozenset((b"x", b"X"))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_HIGH_BYTES = bytes(range(128))
_COMPRESSED = (b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ")
"""gzip and the two xz/lzma magics ``tarfile``'s ``r|*`` detects (bzip2 is checked apart)."""


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


class ArchiveCut(EOFError):
    """The tar stops before its end-of-archive block, between two members or inside a header:
    the members before are whole, what followed is gone."""


class DamagedHeader(tarfile.ReadError):
    """A header after the first member that is not one (bad checksum or numbers): the members
    before are whole, nothing after can be found without guessing."""


class _BadHeader(Exception):
    """A header block that is empty, cut short, or not a header (``tarfile``'s HeaderError)."""


def _read(stream: IO[bytes], size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream (a stream may return short reads)."""
    data = stream.read(size)
    if len(data) < size and data:
        parts = [data]
        missing = size - len(data)
        while missing > 0 and (more := stream.read(missing)):
            parts.append(more)
            missing -= len(more)
        data = b"".join(parts)
    return data


def _skip(stream: IO[bytes], size: int) -> int:
    """Read past ``size`` bytes (no seeking); how many there were."""
    skipped = 0
    while skipped < size and (chunk := stream.read(min(size - skipped, 1 << 20))):
        skipped += len(chunk)
    return skipped


def _text(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A header number: octal text, or GNU base-256 (first byte 0x80 or 0xff), as ``tarfile``."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    try:
        end = field.find(b"\0")
        return int((field if end < 0 else field[:end]).decode("ascii").strip() or "0", 8)
    except ValueError:
        raise _BadHeader("invalid header") from None


def _header(block: bytes) -> tuple[str, bytes, int]:
    """(name, type flag, size) of a 512-byte header block, checksum verified."""
    if len(block) < _BLOCK:
        raise _BadHeader("truncated header" if block else "empty header")
    checksum = _number(block[148:156])
    unsigned = 256 + sum(block) - sum(block[148:156])
    if checksum != unsigned:
        high = len(block[:148].translate(None, _HIGH_BYTES))
        high += len(block[156:].translate(None, _HIGH_BYTES))
        if checksum != unsigned - 256 * high:  # some tars sum signed chars
            raise _BadHeader("bad checksum")
    kind = block[156:157]
    name = _text(block[:100])
    size = _number(block[124:136])
    if size < 0:
        raise _BadHeader("invalid header")
    if kind == b"\0" and name.endswith("/"):
        kind = b"5"
    if kind == b"5":
        name = name.rstrip("/")
    if block[345] and kind not in _GNU_TYPES:
        name = _text(block[345:500]) + "/" + name
    return name, kind, size


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's ``length keyword=value\\n`` records."""
    records: dict[str, str] = {}
    pos = 0
    while match := _PAX_RECORD.match(data, pos):
        length = int(match.group(1))
        if length == 0:
            raise _BadHeader("invalid header")
        value = data[match.end(2) + 1 : match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode(
            "utf-8", "surrogateescape"
        )
        pos += length
    return records


def _padded(size: int) -> int:
    return -size % _BLOCK


def _members(
    stream: IO[bytes], split: Callable[[str], tuple[str, str] | None], read: bool
) -> Iterator[tuple[str, tuple[str, str], bytes]]:
    """(name, split name, data) of the regular members whose ``split`` is not None, in order;
    the data only if ``read`` (else ``b""``, read past). Everything else is read past."""
    first, overrides = True, False
    last = ""  # the last member's name, for errors
    name_override: str | None = None
    size_override: int | None = None
    block = _read(stream, _BLOCK)
    if block.startswith(_COMPRESSED) or (block[:3] == b"BZh" and block[4:10] == b"1AY&SY"):
        yield from _tarfile_members(_Replay(block, stream), split, read)
        return
    while True:
        if block == _ZERO_BLOCK and not overrides:
            return  # the end-of-archive marker
        try:
            if block == _ZERO_BLOCK:
                raise _BadHeader("end of file header")
            name, kind, size = _header(block)
            if kind in (b"L", b"K"):
                data = _read(stream, size + _padded(size))
                if name_override is None and kind == b"L":
                    name_override = _text(data[:size])
            elif kind in _PAX_TYPES or kind == b"g":
                data = _read(stream, size + _padded(size))
                records = _pax_records(data[:size]) if kind != b"g" else {}
                if any(k.startswith("GNU.sparse.") for k in records):
                    raise tarfile.ReadError(f"{name}: sparse tar members are not supported")
                if "path" in records and name_override is None:
                    name_override = records["path"].rstrip("/")
                if "size" in records and size_override is None:
                    try:
                        size_override = int(records["size"])
                    except ValueError:
                        size_override = 0
        except _BadHeader as error:
            if overrides or first:  # tarfile's errors too
                raise tarfile.ReadError(str(error) if first else f"bad header: {error}") from None
            if not block:
                raise ArchiveCut(
                    f"the tar ends after member {last} without its end-of-archive blocks: cut "
                    "between two members"
                ) from None
            if len(block) < _BLOCK:
                raise ArchiveCut(f"the tar is cut inside the header after member {last}") from None
            raise DamagedHeader(f"bad header after member {last}: {error}") from None
        if kind in (b"L", b"K", b"g") or kind in _PAX_TYPES:
            overrides = True
            block = _read(stream, _BLOCK)
            continue
        if kind == b"S":
            raise tarfile.ReadError(f"{name}: sparse tar members are not supported")
        if name_override is not None:
            name = name_override.rstrip("/") if kind == b"5" else name_override
        if size_override is not None:
            size = size_override
        first, overrides, name_override, size_override = False, False, None, None
        last = name
        if kind in _NO_DATA:
            block = _read(stream, _BLOCK)
            continue
        parts = split(name) if kind in _REGULAR else None
        if parts is not None and read:
            data = _read(stream, size)
            if len(data) != size:
                raise EOFError(f"member {name} truncated ({len(data)} of {size} bytes)")
        else:
            data = b""
            got = _skip(stream, size)
            if got != size:
                raise EOFError(f"member {name} truncated ({got} of {size} bytes)")
        if parts is not None:
            yield name, parts, data
        padding = _padded(size)  # read after the member is handed on, as tarfile does
        if padding and _skip(stream, padding) != padding:
            raise tarfile.ReadError(f"unexpected end of data after member {name}")
        block = _read(stream, _BLOCK)


class _Replay:
    """A stream with its first bytes put back (the block read to look for compression)."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.stream.read(size - len(data))


def _tarfile_members(
    stream: IO[bytes] | _Replay, split: Callable[[str], tuple[str, str] | None], read: bool
) -> Iterator[tuple[str, tuple[str, str], bytes]]:
    """:func:`_members` by ``tarfile`` (compressed tars)."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:  # type: ignore[call-overload]
        for info in tar:
            parts = split(info.name) if info.isreg() else None
            if parts is None:
                continue
            data = b""
            if read:
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise EOFError(
                        f"member {info.name} truncated ({len(data)} of {info.size} bytes)"
                    )
            yield info.name, parts, data


def group_samples(
    members: Iterator[tuple[str, tuple[str, str], bytes]], url: str
) -> Iterator[RawSample]:
    """Samples out of :func:`_members`' (name, (key, suffix), data) in file order: a run of
    members sharing a key, a new sample where a key repeats a suffix. Where the members end at
    an :class:`ArchiveCut` or :class:`DamagedHeader`, the sample being collected (whole members,
    maybe not all of them: the decode step says which are missing) is yielded before the
    error."""
    key: str | None = None
    members_of_key: dict[str, bytes] = {}
    index = 0
    try:
        for _, (member_key, suffix), data in members:
            if member_key != key or suffix in members_of_key:
                if key is not None:
                    yield RawSample(key, members_of_key, url, index)
                    index += 1
                key, members_of_key = member_key, {}
            members_of_key[suffix] = data
    except (ArchiveCut, DamagedHeader):
        if key is not None:
            yield RawSample(key, members_of_key, url, index)
        raise
    if key is not None:
        yield RawSample(key, members_of_key, url, index)


def iter_samples(stream: IO[bytes], url: str) -> Iterator[RawSample]:
    """Yield the samples of one tar stream in order.

    Raises ``tarfile.ReadError`` on bytes that are not a tar or a damaged header, ``EOFError``
    on a member cut short or a tar without its end (``OSError`` from the stream itself): the
    samples before the damage have been yielded already.
    """
    yield from group_samples(_members(stream, _split, read=True), url)


def iter_keys(stream: IO[bytes]) -> Iterator[str]:
    """The sample keys of one tar stream, in order, without reading member data into memory
    (a start-up check that every sample has a sidecar entry reads only the headers' names)."""
    for sample in group_samples(_members(stream, _split, read=False), ""):
        yield sample.key
