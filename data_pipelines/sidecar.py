"""Sidecars: one precomputed tensor per training sample, looked up by sample key, at 10^8 keys.

A sidecar is one valid safetensors file holding four tensors and a small metadata header:

- ``values`` ``[N, ...]``: the rows (PRIOR's log P_r, ProtoCLIP's teacher embeddings);
- ``keys`` uint8 ``[N, L]``: the sample keys, utf-8, null-padded to the longest ``L``, SORTED
  bytewise, row i naming ``values[i]``;
- ``shard_names`` uint8 ``[S, Ls]`` and ``shard_sizes`` int64 ``[S]``: the shards the file was
  made from (:func:`shard_name`) and how many samples of each it holds, so that the start-up
  check compares them with ``sizes.json`` instead of reading every shard;
- metadata: ``vlp_sidecar`` (:data:`VERSION`), ``id`` and whatever the writer adds.

:class:`Sidecar` parses the header once, memory-maps ``keys`` as ``S{L}`` and ``values``, and
finds a key with ``np.searchsorted``: O(log N) per lookup, no per-key Python object, and a
header of a few hundred bytes whatever N (the old format, one tensor per key, had a header of
hundreds of MB at 10^7 keys, parsed by every worker, and listed every key per lookup).
:class:`SidecarWriter` streams rows to a spool beside the output and sorts the keys once at
the end. Old files are refused with the command that converts them (:func:`convert_sidecar`).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from vlp.atomic_files import atomic_path
from vlp.config import redact_url

VERSION = "2"
"""The ``vlp_sidecar`` metadata value of this format (the old one-tensor-per-key files lack it)."""
FORMAT_KEY = "vlp_sidecar"
CONVERTED_SIZE_KEY = "converted_from_bytes"
"""Metadata of a converted file: the old file's size, which the resume fingerprint keeps, so a
run started on the old file resumes on the converted one (same values, same ``id``)."""
KEYS, VALUES, SHARD_NAMES, SHARD_SIZES = "keys", "values", "shard_names", "shard_sizes"
MAX_HEADER = 1 << 20
"""A longer header is not this format's (its header does not grow with N)."""
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
_CHUNK = 65536


class SidecarFormatError(ValueError):
    """A file that is not a sidecar of this format; the message says what to run."""


class DuplicateKeyError(ValueError):
    """A sample key given twice to a :class:`SidecarWriter` (``key``)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"sample key '{key}' appears twice")
        self.key = key


def convert_command(path: str | os.PathLike[str]) -> str:
    """The command that converts an old sidecar in place."""
    return f"vlp shards convert-sidecar {path}"


def shard_name(url: str) -> str:
    """How a sidecar names a shard: a local one by absolute path, a remote one by its URL,
    credentials masked (so the name written equals the name a training run computes)."""
    url = redact_url(str(url))
    if url.startswith("file://") or ("://" not in url and not url.startswith("pipe:")):
        return os.path.abspath(url.removeprefix("file://"))
    return url


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensor entries, metadata, offset of the data) of sidecar ``path``, checked. A header
    longer than :data:`MAX_HEADER` is not parsed: only the old format grows one.

    Raises:
        SidecarFormatError: not a safetensors file, the old format (with the command that
            converts it), another format version, or a file shorter than its header says.
        FileNotFoundError: no file at ``path``.
    """
    not_safetensors = f"sidecar {path} is not a safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SidecarFormatError(not_safetensors)
        (length,) = struct.unpack("<Q", head)
        if length > os.path.getsize(path) - 8:
            raise SidecarFormatError(f"{not_safetensors} (its header would end past the file)")
        try:
            header = json.loads(f.read(length)) if length <= MAX_HEADER else {}
        except ValueError as error:  # UnicodeDecodeError included
            raise SidecarFormatError(f"{not_safetensors} ({error})") from None
    if not isinstance(header, dict):
        raise SidecarFormatError(not_safetensors)
    metadata = header.pop("__metadata__", None) or {}
    version = metadata.get(FORMAT_KEY)
    if version is None:
        raise SidecarFormatError(
            f"sidecar {path} is in the old format (one tensor per sample key, too slow beyond "
            f"10^5 keys); convert it in place with: {convert_command(path)}"
        )
    if version != VERSION or not {KEYS, VALUES} <= set(header):
        raise SidecarFormatError(
            f"sidecar {path} has format version {version}, this vlp reads {VERSION}; remake it "
            "with this vlp's command"
        )
    try:
        end = max(int(entry["data_offsets"][1]) for entry in header.values())
    except (KeyError, TypeError, IndexError, ValueError):
        raise SidecarFormatError(f"{not_safetensors} (a bad tensor entry)") from None
    if os.path.getsize(path) < 8 + length + end:
        raise SidecarFormatError(f"sidecar {path} is truncated; remake it")
    return header, metadata, 8 + length


def sidecar_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of sidecar ``path`` (its header only). Raises SidecarFormatError."""
    return read_header(path)[1]


def _map(path: str, entry: Mapping[str, Any], start: int, dtype: Any = None) -> np.ndarray:
    """Tensor ``entry`` of the file as a read-only array (memory-mapped; ``dtype`` overrides)."""
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if dtype is None:
        dtype = _DTYPES[entry["dtype"]]
    elif shape:  # uint8 [N, L] read as S{L} [N]
        shape = shape[:1]
    if end == begin:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape).view(
        np.ndarray
    )


class Sidecar:
    """An open sidecar: ``len``, ``key in sidecar``, :meth:`get`, :meth:`contains`, :meth:`shards`.

    Nothing is read per key beyond the pages the binary search and the row touch.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        header, self.metadata, start = read_header(self.path)
        width = int(header[KEYS]["shape"][1]) if len(header[KEYS]["shape"]) == 2 else 1
        self.width = max(width, 1)
        self.keys = _map(self.path, header[KEYS], start, f"S{self.width}")
        self.values = _map(self.path, header[VALUES], start)
        self.bfloat16 = header[VALUES]["dtype"] == "BF16"
        # mapped now, as the keys are: a file replaced under the same name later is another file
        self._shard_arrays = (
            (
                _map(self.path, header[SHARD_NAMES], start),
                _map(self.path, header[SHARD_SIZES], start),
            )
            if SHARD_NAMES in header
            else None
        )

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, key: str) -> int:
        """Row of ``key``, or -1 when the file lacks it."""
        raw = key.encode()
        if len(raw) > self.width or not len(self.keys):
            return -1
        i = int(np.searchsorted(self.keys, raw))
        return i if i < len(self.keys) and self.keys[i] == raw else -1

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.index(key) >= 0

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` as a tensor (a copy, so the mapping can go)."""
        value = torch.from_numpy(np.array(self.values[i]))
        return value.view(torch.bfloat16) if self.bfloat16 else value

    def get(self, key: str) -> torch.Tensor | None:
        """The row of ``key``, or None when the file lacks it."""
        i = self.index(key)
        return None if i < 0 else self.row(i)

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """bool ``[len(keys)]``: which ``keys`` the file has (one vectorised search)."""
        raw = [k.encode() for k in keys]
        fits = np.array([len(r) <= self.width for r in raw], dtype=bool)
        if not len(self.keys) or not raw:
            return np.zeros(len(raw), dtype=bool)
        needles = np.array([r if f else b"" for r, f in zip(raw, fits, strict=True)],
                           dtype=f"S{self.width}")  # fmt: skip
        at = np.minimum(np.searchsorted(self.keys, needles), len(self.keys) - 1)
        return fits & (self.keys[at] == needles)

    def key(self, i: int) -> str:
        """Sample key of row ``i``."""
        return bytes(self.keys[i]).decode()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, row) in key order."""
        for i in range(len(self)):
            yield self.key(i), self.row(i)

    def shards(self) -> dict[str, int]:
        """The shards the file was made from (:func:`shard_name`) -> its samples of each."""
        if self._shard_arrays is None:
            return {}
        names, sizes = self._shard_arrays
        width = max(names.shape[1] if names.ndim == 2 else 1, 1)
        names = np.ascontiguousarray(names).view(f"S{width}").reshape(-1)
        return {bytes(n).decode(): int(s) for n, s in zip(names, sizes, strict=True)}


@functools.lru_cache(maxsize=8)
def open_sidecar(path: str) -> Sidecar:
    """One open :class:`Sidecar` per file and process (memory-mapped; lookups are cheap), for
    the per-sample lookups of a run, whose sidecars do not change under it; a check that must
    see a file rebuilt since (the start-up check) opens a :class:`Sidecar` of its own.
    Raises SidecarFormatError (an old file: the message names the converting command)."""
    return Sidecar(path)


def _bytes_of(values: torch.Tensor | np.ndarray) -> tuple[np.ndarray, str]:
    """Rows as a contiguous numpy array and their safetensors dtype name."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().contiguous()
        if values.dtype == torch.bfloat16:
            return values.view(torch.uint16).numpy(), "BF16"
        values = values.numpy()
    values = np.ascontiguousarray(values)
    if values.dtype not in _NAMES:
        raise ValueError(f"sidecar values of dtype {values.dtype} are not supported")
    return values, _NAMES[values.dtype]


def _padded(strings: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """uint8 ``[n, L]`` of byte strings null-padded to the longest (``L`` >= 1)."""
    array = np.asarray(strings, dtype=bytes) if len(strings) else np.zeros(0, "S1")
    width = max(array.dtype.itemsize, 1)
    return np.ascontiguousarray(array.astype(f"S{width}")).view(np.uint8).reshape(-1, width)


class SidecarWriter:
    """Writes a sidecar from rows given in any order, chunk by chunk; the file appears only
    when :meth:`close` succeeds (atomically, :func:`vlp.atomic_files.atomic_path`).

    Rows go to a spool file beside ``path`` as they come; the keys (bytes, a few per sample)
    stay in memory until :meth:`close` sorts them. Use as a context manager: leaving it by an
    exception removes the spool and writes nothing::

        with SidecarWriter(out, metadata={"id": ...}) as writer:
            writer.add(["key0", "key1"], torch.zeros(2, 64))
            writer.add_shard("/data/00000.tar", 2)
    """

    def __init__(
        self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._keys: list[np.ndarray] = []
        self._shards: dict[str, int] = {}
        self._row: tuple[tuple[int, ...], str] | None = None
        self._count = 0
        self._spool_path = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.spool")
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115 - closed by close/discard

    def add(self, keys: Sequence[str], values: torch.Tensor | np.ndarray) -> None:
        """Rows ``values[i]`` for sample ``keys[i]`` (all rows of one shape and dtype)."""
        array, dtype = _bytes_of(values)
        if len(keys) != len(array):
            raise ValueError(f"{len(keys)} keys for {len(array)} rows")
        row = (tuple(array.shape[1:]), dtype)
        if self._row not in (None, row):
            raise ValueError(f"rows of shape/dtype {row}, earlier ones {self._row}")
        self._row = row
        self._keys.append(np.array([k.encode() for k in keys], dtype=bytes))
        self._spool.write(array.tobytes())
        self._count += len(array)

    def add_shard(self, url: str, count: int) -> None:
        """Record that the file holds ``count`` samples of shard ``url`` (for the start-up
        check, which then trusts ``sizes.json`` instead of reading the shard)."""
        self._shards[shard_name(url)] = self._shards.get(shard_name(url), 0) + int(count)

    def close(self) -> int:
        """Sort, check and write the file; the number of rows.

        Raises:
            DuplicateKeyError: a key added twice (nothing is written).
        """
        try:
            self._spool.close()
            keys = np.concatenate(self._keys) if self._keys else np.zeros(0, "S1")
            keys = keys.astype(f"S{max(keys.dtype.itemsize, 1)}")
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            twice = np.flatnonzero(keys[1:] == keys[:-1])
            if twice.size:
                raise DuplicateKeyError(bytes(keys[twice[0]]).decode())
            self._write(_padded(keys), order)
        finally:
            self.discard()
        return self._count

    def discard(self) -> None:
        """Remove the spool; nothing is written."""
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)

    def _write(self, keys: np.ndarray, order: np.ndarray) -> None:
        shape, dtype = self._row or ((), "F32")
        row_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        names = _padded([name.encode() for name in self._shards])
        sizes = np.array(list(self._shards.values()), dtype=np.int64)
        tensors = [(SHARD_SIZES, "I64", [len(sizes)], sizes.nbytes),
                   (VALUES, dtype, [self._count, *shape], self._count * row_bytes),
                   (KEYS, "U8", list(keys.shape), keys.nbytes),
                   (SHARD_NAMES, "U8", list(names.shape), names.nbytes)]  # fmt: skip
        header: dict[str, Any] = {"__metadata__": {**self.metadata, FORMAT_KEY: VERSION}}
        offset = 0
        for name, kind, tensor_shape, nbytes in tensors:
            header[name] = {"dtype": kind, "shape": tensor_shape,
                            "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned
        spool = (
            np.memmap(self._spool_path, np.uint8, "r", shape=(self._count, row_bytes))
            if self._count and row_bytes
            else np.zeros((self._count, row_bytes), np.uint8)
        )
        with atomic_path(self.path) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            out.write(sizes.tobytes())
            for start in range(0, self._count, _CHUNK):
                out.write(spool[order[start : start + _CHUNK]].tobytes())
            out.write(keys.tobytes())
            out.write(names.tobytes())

    def __enter__(self) -> SidecarWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


def write_sidecar(
    path: str | os.PathLike[str], rows: Mapping[str, torch.Tensor] | Iterable[tuple[str, Any]],
    metadata: Mapping[str, str] | None = None, shards: Mapping[str, int] | None = None,
) -> int:  # fmt: skip
    """Write ``rows`` (key -> tensor, or (key, tensor) pairs) as a sidecar in one call; the
    number of rows. ``shards``: url -> samples (:meth:`SidecarWriter.add_shard`)."""
    items = rows.items() if isinstance(rows, Mapping) else rows
    writer = SidecarWriter(path, metadata)
    try:
        keys: list[str] = []
        chunk: list[Any] = []
        for key, value in items:
            keys.append(key)
            chunk.append(torch.as_tensor(value))
            if len(keys) == _CHUNK:
                writer.add(keys, torch.stack(chunk))
                keys, chunk = [], []
        if keys:
            writer.add(keys, torch.stack(chunk))
        for url, count in (shards or {}).items():
            writer.add_shard(url, count)
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def _old_rows(path: str | os.PathLike[str]) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """Metadata and (key, header entry) pairs of an old sidecar. Parsed here, not by
    safetensors, which refuses headers above 100 MB (an old file of ~10^6 keys or more)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))  # checked by read_header
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None) or {}
    return metadata, [(key, (8 + length, entry)) for key, entry in header.items()]


def convert_sidecar(old: str | os.PathLike[str], new: str | os.PathLike[str] | None = None) -> int:
    """Rewrite an old one-tensor-per-key sidecar ``old`` in this format, at ``new`` (default: in
    place, atomically); the number of rows. Its ``id`` and metadata are kept, and the old size
    is recorded, so the resume fingerprint is unchanged. It records no shards, so the start-up
    check reads the shards' member names once to check it. Memory: the old header, parsed.

    Raises:
        SidecarFormatError: ``old`` is already in this format, is not a safetensors file, or
            its tensors are not all of one shape and dtype.
    """
    try:
        read_header(old)
    except SidecarFormatError as error:
        if "old format" not in str(error):
            raise
    else:
        raise SidecarFormatError(f"sidecar {old} is already in format version {VERSION}")
    data = np.memmap(old, np.uint8, mode="r")

    def row(start: int, entry: Mapping[str, Any]) -> torch.Tensor:
        begin, end = (start + int(offset) for offset in entry["data_offsets"])
        array = np.array(data[begin:end]).view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        value = torch.from_numpy(array)
        return value.view(torch.bfloat16) if entry["dtype"] == "BF16" else value

    try:
        metadata, entries = _old_rows(old)
        metadata = {**metadata, CONVERTED_SIZE_KEY: str(os.path.getsize(old))}
        return write_sidecar(new or old, ((k, row(*e)) for k, e in entries), metadata)
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as error:
        raise SidecarFormatError(
            f"sidecar {old} is not one safetensors tensor per sample key, all of one shape and "
            f"dtype ({type(error).__name__}: {error})"
        ) from None
