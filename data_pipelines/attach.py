"""Attach fields (a summary, detected objects, anything else) to existing shards, by sample key.

``vlp shards attach`` joins a JSONL file of records ``{"key": <sample key>, <field>: ...}`` to
shards written by :mod:`data_pipelines.write` (or img2dataset) and writes NEW shards, same
names, into another folder: each record's fields are merged into its sample's ``json`` member
(created when the sample has none; a record's key replaces a json key of the same name) and
every other member is copied byte for byte. ``summary`` and ``objects`` are checked with
:func:`data_pipelines.object_fields.check_fields`, the validator's rules, before anything is
written. The shards are written under temporary names and renamed only once every shard is
complete, so a failed attach leaves the output folder as it was; ``sizes.json`` comes last. The
shards' ``_stats.json`` and the folder's ``classnames.txt``, where present, are copied along.

The JSONL is indexed by byte offset and each record re-read when its sample comes, so records
with region features need not all fit in memory.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import webdataset as wds
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from data_pipelines.decode import DATA_ERRORS
from data_pipelines.object_fields import FieldError, check_fields
from data_pipelines.shards import Urls, expand_urls
from data_pipelines.tario import RawSample, iter_samples
from data_pipelines.write import CLASSNAMES_FILE, SIZES_FILE

_EXAMPLES = 5
"""How many keys an error or a report names."""

Index = dict[str, tuple[int, int]]
"""Record key -> (byte offset, line number) in the JSONL."""


class AttachError(ValueError):
    """A record, shard or sample that cannot be attached; the message says where and why."""


@dataclass
class AttachReport:
    """What one attach did, in samples and records."""

    samples: int = 0
    attached: int = 0
    """Samples that got a record's fields."""
    without_record: int = 0
    unused_records: int = 0
    """Records whose key matches no sample (a typo, or records for other shards)."""
    shards: int = 0
    overridden: int = 0
    """Json keys that a record's field replaced, summed over the samples."""
    unused_examples: list[str] = field(default_factory=list)
    """The first few keys of unused records."""


def _parse_record(line: bytes, where: str) -> tuple[str, dict[str, Any]]:
    """The key and checked fields of one JSONL line (``where``: file and line number)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as error:  # bad JSON, not UTF-8, hostile nesting
        raise AttachError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise AttachError(f"{where}: a record must be a JSON object, got {line[:80]!r}")
    key = record.pop("key", None)
    if not isinstance(key, str) or not key:
        raise AttachError(f'{where}: no "key" (the sample key, a non-empty string), got {key!r}')
    try:
        check_fields(record)
    except FieldError as error:
        raise AttachError(f"{where} (key {key!r}): {error}") from None
    return key, record


def _index_records(jsonl: str) -> Index:
    """Check every record of ``jsonl`` and index them by key; blank lines are allowed.

    Raises:
        AttachError: the first bad line (not JSON, no key, a duplicate key, a bad summary or
            objects), naming its line number and key.
    """
    index: Index = {}
    offset = 0
    with fsspec.open(jsonl, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                where = f"{jsonl} line {number}"
                key, _ = _parse_record(line, where)
                if key in index:
                    first = index[key][1]
                    raise AttachError(f"{where}: duplicate key {key!r} (also line {first})")
                index[key] = (offset, number)
            offset += len(line)
    return index


def _location(url: str) -> tuple[Any, str]:
    """(filesystem protocol, absolute path) of a folder, to tell whether two name one place."""
    fs, path = fsspec.core.url_to_fs(url or ".")
    path = path.rstrip("/")
    return fs.protocol, os.path.realpath(path) if isinstance(fs, LocalFileSystem) else path


def _input_shards(shards: Urls, out: str) -> list[str]:
    """The input shard URLs; refused when two share a name or one lies in ``out``."""
    urls = expand_urls(shards)
    names = Counter(posixpath.basename(url) for url in urls)
    clashes = sorted(name for name, n in names.items() if n > 1)
    if clashes:
        raise AttachError(
            f"attach: {len(clashes)} shard names occur in several input folders (e.g. "
            f"{clashes[0]!r}); the output keeps the names, so attach one folder at a time"
        )
    target = _location(out)
    inside = [url for url in urls if _location(posixpath.dirname(url)) == target]
    if inside:
        raise AttachError(
            f"attach: the output folder {out} holds the input shards (e.g. {inside[0]}); attach "
            "never edits shards in place: choose another output folder"
        )
    return urls


def _dataset_files(fs: AbstractFileSystem, root: str) -> list[str]:
    """Names in ``root`` that belong to a shard dataset (shards and their sidecars)."""
    names = (posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    own = (".tar", "_stats.json")
    return sorted(n for n in names if n.endswith(own) or n in (SIZES_FILE, CLASSNAMES_FILE))


def _prepare_output(fs: AbstractFileSystem, root: str, out: str, overwrite: bool) -> None:
    """Create the output folder; refuse one that holds shards unless ``overwrite``."""
    if fs.exists(root) and not fs.isdir(root):
        raise NotADirectoryError(f"attach: {out} exists and is not a directory")
    fs.makedirs(root, exist_ok=True)
    existing = _dataset_files(fs, root)
    if existing and not overwrite:
        raise FileExistsError(
            f"attach: output folder {out} already holds shards ({len(existing)} files, e.g. "
            f"{existing[0]!r}); choose another folder or overwrite them (overwrite=True, "
            "vlp shards attach --overwrite)"
        )


def _read_shard(url: str) -> Iterator[RawSample]:
    """The shard's samples; a shard that cannot be read is an :class:`AttachError`."""
    try:
        with fsspec.open(url, "rb") as stream:
            yield from iter_samples(stream, url)
    except DATA_ERRORS as error:
        raise AttachError(
            f"attach: cannot read shard {url} ({error!r}); vlp shards validate names the damage"
        ) from error


def _existing_json(raw: RawSample) -> dict[str, Any]:
    """The sample's json member as a dict (``{"key": ...}``, as the writer puts, when absent)."""
    if "json" not in raw.members:
        return {"key": raw.key}
    try:
        meta = json.loads(raw.members["json"])
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise AttachError(
            f"attach: {raw.url}: sample {raw.key}'s json member is not a JSON object, so fields "
            "cannot be merged into it"
        )
    return meta


class _Join:
    """Merges each sample's record into its json member, counting into ``report``."""

    def __init__(self, index: Index, jsonl: IO[bytes]) -> None:
        self.index, self.jsonl = index, jsonl
        self.report = AttachReport()
        self.matched: set[str] = set()
        self.missing: list[str] = []
        """The first keys of samples without a record."""

    def members(self, raw: RawSample) -> dict[str, bytes]:
        """The sample's members to write: its own, with the record merged into ``json``."""
        self.report.samples += 1
        if raw.key not in self.index:
            self.report.without_record += 1
            if len(self.missing) < _EXAMPLES:
                self.missing.append(raw.key)
            return raw.members
        self.jsonl.seek(self.index[raw.key][0])
        fields = json.loads(self.jsonl.readline())
        del fields["key"]
        meta = _existing_json(raw)
        self.report.overridden += len(fields.keys() & meta.keys())
        self.report.attached += 1
        self.matched.add(raw.key)
        merged = json.dumps({**meta, **fields}, sort_keys=True).encode("utf-8")
        return {**raw.members, "json": merged}

    def finish(self, shards: int) -> AttachReport:
        """The report, with the unused records counted."""
        unused = [key for key in self.index if key not in self.matched]
        self.report.shards = shards
        self.report.unused_records = len(unused)
        self.report.unused_examples = unused[:_EXAMPLES]
        return self.report


def _write_shard(url: str, fs: AbstractFileSystem, path: str, join: _Join) -> int:
    """Write ``url``'s samples, records merged, to ``path``; return how many."""
    count = 0
    # As data_pipelines.write: fixed int mtime, so the same input gives byte-identical shards
    # (and no pax header per member).
    with fs.open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
        for raw in _read_shard(url):
            writer.write({"__key__": raw.key, **join.members(raw)})
            count += 1
    return count


def _put(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name."""
    fs.pipe_file(f"{path}.tmp", data)
    fs.mv(f"{path}.tmp", path)


def _copy(fs: AbstractFileSystem, source: str, path: str) -> None:
    """Copy ``source`` (any URL) to ``path``, when it exists."""
    source_fs, source_path = fsspec.core.url_to_fs(source)
    if source_fs.exists(source_path):
        _put(fs, path, source_fs.cat_file(source_path))


def _commit(fs: AbstractFileSystem, root: str, urls: list[str], sizes: dict[str, int]) -> None:
    """Replace the output's dataset with the written shards: rename them, copy the sidecars,
    and write ``sizes.json`` last."""
    for name in _dataset_files(fs, root):
        if name not in sizes:
            fs.rm(posixpath.join(root, name))
    for name in sizes:
        fs.mv(posixpath.join(root, f"{name}.tmp"), posixpath.join(root, name))
    for url in urls:
        stats = f"{posixpath.splitext(posixpath.basename(url))[0]}_stats.json"
        _copy(fs, posixpath.join(posixpath.dirname(url), stats), posixpath.join(root, stats))
    folders = {posixpath.dirname(url) for url in urls}
    if len(folders) == 1:
        source = posixpath.join(folders.pop(), CLASSNAMES_FILE)
        _copy(fs, source, posixpath.join(root, CLASSNAMES_FILE))
    _put(fs, posixpath.join(root, SIZES_FILE), json.dumps(sizes, indent=1, sort_keys=True).encode())


def _require_all(join: _Join, jsonl: str) -> None:
    if join.report.without_record:
        raise AttachError(
            f"attach: {join.report.without_record} samples have no record in {jsonl} (e.g. "
            f"{', '.join(join.missing)}); add records for them or allow it (require_all=False, "
            "no --require-all)"
        )


def attach_fields(
    shards: Urls,
    jsonl_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    require_all: bool = False,
) -> AttachReport:
    """Write ``shards`` (a folder, brace pattern or list) into ``out_dir`` with the records of
    ``jsonl_path`` merged into their samples' json; see the module docstring.

    ``out_dir`` must not hold shards unless ``overwrite`` (its old shards and sidecars are then
    replaced) and is never the input folder. ``require_all`` makes a sample without a record an
    error. Nothing in ``out_dir`` changes unless every shard was written.

    Raises:
        AttachError: a bad record (line number and key), an unreadable shard or json member,
            samples without a record under ``require_all``, ``out_dir`` holding the input.
        FileExistsError: ``out_dir`` holds shards and ``overwrite`` is False.
        FileNotFoundError: no shards match, or the JSONL does not exist.
    """
    jsonl, out = os.fspath(jsonl_path), os.fspath(out_dir)
    urls = _input_shards(shards, out)
    index = _index_records(jsonl)
    fs, root = fsspec.core.url_to_fs(out)
    _prepare_output(fs, root, out, overwrite)
    sizes: dict[str, int] = {}
    temporary = [posixpath.join(root, f"{posixpath.basename(url)}.tmp") for url in urls]
    try:
        with fsspec.open(jsonl, "rb") as records:
            join = _Join(index, records)
            for url, path in zip(urls, temporary, strict=True):
                sizes[posixpath.basename(url)] = _write_shard(url, fs, path, join)
        if require_all:
            _require_all(join, jsonl)
    except BaseException:
        for path in temporary:
            if fs.exists(path):
                fs.rm(path)
        raise
    _commit(fs, root, urls, sizes)
    return join.finish(len(sizes))
