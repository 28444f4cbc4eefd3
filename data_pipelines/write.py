"""Write samples into tar shards in img2dataset's layout (docs/architecture.md §3).

Layout: ``%05d.tar`` shards whose members are ``<key>.jpg|png|webp``, ``<key>.txt``,
``<key>.json``, (when the sample has a class) ``<key>.cls`` and the sample's extra members
(``<key>.summary.txt``, ``<key>.objects.json``); next to them one ``%05d_stats.json`` per shard
and a ``sizes.json`` mapping shard basename -> sample count, which the stream uses to count
samples without opening the tars; when the class names are known (a folder of class
subfolders), a ``classnames.txt`` (one per line, line i names ``cls`` i) that ``vlp eval``
reads. The output may be a local folder or any fsspec URL. The
per-sample work (read, check, shrink, encode the image) is :mod:`data_pipelines.prepare`'s;
this module runs it, in parallel if asked, and lays the results out.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import posixpath
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import Any

import fsspec
import webdataset as wds
from fsspec import AbstractFileSystem

from data_pipelines.decode import SampleError
from data_pipelines.prepare import IMAGE_FORMATS, Skipped, prepare_sample

Prepared = dict[str, Any] | Skipped
SIZES_FILE = "sizes.json"
CLASSNAMES_FILE = "classnames.txt"
_BATCH = 16


class NothingWritten(ValueError):
    """No sample could be written (all were skipped, or there were none): no shard, no
    ``sizes.json`` or ``classnames.txt``, and a folder that the write created is removed, so
    that the same command runs again once the input is fixed."""


def _prepared(
    samples: Iterable[dict[str, Any]], prepare: Callable[[dict[str, Any]], Prepared], workers: int
) -> Iterator[Prepared]:
    """``prepare`` mapped over ``samples`` in input order, in ``workers`` processes when > 1.

    Batches are collected in the order they were submitted with a few in flight ahead of the
    writer, so memory stays bounded and the shards do not depend on the worker count. Workers
    are spawned, not forked (the parent may hold threads: torch, fsspec's event loop); a worker
    that dies breaks the pool with an error instead of hanging the write.
    """
    if workers <= 1:
        yield from map(prepare, samples)
        return
    stream = iter(samples)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        # Executor.map submits a whole batch at once and yields its results in order.
        in_flight: deque[Iterator[Prepared]] = deque()
        while batch := list(islice(stream, _BATCH)):
            in_flight.append(pool.map(prepare, batch, chunksize=4))
            if len(in_flight) > 2 * workers:
                yield from in_flight.popleft()
        while in_flight:
            yield from in_flight.popleft()


def _write_shard(
    fs: AbstractFileSystem,
    items: Iterator[Prepared],
    path: str,
    n: int,
    on_skip: Callable[[Skipped], None] | None,
) -> tuple[int, dict[str, int]]:
    """Write up to ``n`` samples to ``path`` via a temporary name.

    Returns how many were written (0: none, and no file) and the skips per stage.
    """
    tmp = f"{path}.tmp"
    count = 0
    failed = {"read": 0, "decode": 0}
    try:
        # Fixed mtime: the same samples give byte-identical shards. An int: a float mtime makes
        # tarfile's pax format write a pax header before every member, which readers then parse.
        with fs.open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
            for item in items:
                if isinstance(item, Skipped):
                    if on_skip is None:
                        raise SampleError(f"{item.where}: {item.reason}")
                    on_skip(item)
                    failed[item.stage] += 1
                    continue
                writer.write(item)
                count += 1
                if count == n:
                    break
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    if count == 0:
        fs.rm(tmp)
    else:
        fs.mv(tmp, path)
    return count, failed


def _write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    fs.mv(tmp, path)


def _prepare_output(fs: AbstractFileSystem, root: str, out: str, overwrite: bool) -> None:
    """Create the output folder; refuse a non-empty one unless ``overwrite`` (then clear it)."""
    if fs.exists(root) and not fs.isdir(root):
        raise NotADirectoryError(f"write_shards: {out} exists and is not a directory")
    fs.makedirs(root, exist_ok=True)
    existing = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    if existing and not overwrite:
        raise FileExistsError(
            f"write_shards: output folder {out} is not empty ({len(existing)} entries, e.g. "
            f"{existing[0]!r}); choose an empty folder or overwrite it (overwrite=True, "
            "vlp shards write --overwrite)"
        )
    for name in existing:
        if name.endswith((".tar", "_stats.json", ".tmp")) or name in (SIZES_FILE, CLASSNAMES_FILE):
            fs.rm(posixpath.join(root, name))


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    overwrite: bool = False,
    max_side: int | None = None,
    workers: int = 1,
    on_skip: Callable[[Skipped], None] | None = None,
    classnames: Sequence[str] | None = None,
) -> list[str]:
    """Write ``samples`` to shards in ``out_dir`` (a folder or an fsspec URL); return their paths.

    A sample is a dict with ``key, image, txt`` and optional ``json, cls`` and extra members
    (see :func:`data_pipelines.prepare.prepare_sample`). Each shard is written under a temporary
    name and renamed once complete, so a crash never leaves a truncated ``.tar`` that looks
    valid. ``out_dir`` must be empty or absent unless ``overwrite`` (which removes the old
    shards and sidecars first), because mixing two datasets' shards in one folder silently
    corrupts ``sizes.json``.

    ``max_side`` shrinks larger images (aspect kept) and re-encodes them. ``workers`` > 1 reads,
    decodes and encodes images in that many processes; the shards are byte-identical whatever
    the count. An image file that cannot be read or decoded is passed to ``on_skip`` and left
    out (counted in the shard's ``_stats.json``); without ``on_skip`` it raises
    ``SampleError``. Image bytes are stored as given unless ``max_side`` is set.
    ``classnames`` (the names of ``cls`` 0, 1, ...) are written to ``classnames.txt``.

    Raises:
        NothingWritten: no sample could be written (see the class).
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}"
        )
    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side must be > 0, got {max_side}")
    out = os.fspath(out_dir)
    fs, root = fsspec.core.url_to_fs(out)
    created = not fs.exists(root)
    _prepare_output(fs, root, out, overwrite)

    prepare = functools.partial(
        prepare_sample, image_format=image_format, quality=quality, max_side=max_side
    )
    items = _prepared(samples, prepare, workers)
    paths: list[str] = []
    sizes: dict[str, int] = {}
    skipped = 0
    while True:
        index = len(paths)
        name = f"{index:05d}.tar"
        count, failed = _write_shard(
            fs, items, posixpath.join(root, name), samples_per_shard, on_skip
        )
        skipped += sum(failed.values())
        if count == 0:
            break
        stats = {
            "count": count + sum(failed.values()),
            "successes": count,
            "failed_to_download": failed["read"],
            "failed_to_resize": failed["decode"],
        }
        _write_json(fs, posixpath.join(root, f"{index:05d}_stats.json"), stats)
        sizes[name] = count
        paths.append(posixpath.join(out, name))
        if count < samples_per_shard:
            break
    if not paths:
        if created:
            fs.rm(root, recursive=True)
        why = f"all {skipped} were skipped" if skipped else "the input holds none"
        raise NothingWritten(f"write_shards: no sample was written to {out}: {why}")
    if classnames is not None:
        with fs.open(posixpath.join(root, CLASSNAMES_FILE), "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in classnames))
    _write_json(fs, posixpath.join(root, SIZES_FILE), sizes)
    return paths
