"""vlp's own shards (img2dataset's layout) read as an :class:`~evals.eval_set.EvalSet`.

What ``vlp shards write`` and the demo's held-out set write (:mod:`data_pipelines.write`)::

    ROOT/00000.tar, 00001.tar, ...   <key>.jpg|png|webp, <key>.txt, [<key>.json], [<key>.cls]
    ROOT/sizes.json                  shard name -> sample count
    ROOT/00000_stats.json, ...       per-shard write statistics
    ROOT/classnames.txt              class names, one per line (when written from a class folder)

The same shards serve both tasks, so the caller says which one it asks for: classification
reads ``cls`` (class names from the caller, else ``classnames.txt``), retrieval reads ``txt``
(the image's captions, one per line). Samples are read as :func:`evals.wds_layout.
shard_samples` reads CLIP_benchmark's, whose members are the same.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Literal

import fsspec

from data_pipelines.tario import iter_samples
from data_pipelines.write import CLASSNAMES_FILE, SIZES_FILE
from evals.eval_set import EvalDataError, EvalSet
from evals.wds_layout import shard_samples


def is_img2dataset_layout(root: str) -> bool:
    """Whether ``root`` (a folder or fsspec URL) holds ``*.tar`` shards and a ``sizes.json``."""
    fs, local = fsspec.core.url_to_fs(root)
    if not fs.isfile(posixpath.join(local, SIZES_FILE)):
        return False
    return any(str(p).endswith(".tar") for p in fs.ls(local, detail=False))


def _classnames(fs: fsspec.AbstractFileSystem, root: str, local: str) -> list[str] | None:
    path = posixpath.join(local, CLASSNAMES_FILE)
    if not fs.isfile(path):
        return None
    with fs.open(path, "rt", encoding="utf-8") as handle:
        lines = [line.strip() for line in handle.read().splitlines()]
    if not lines or not all(lines):
        raise EvalDataError(f"{root}/{CLASSNAMES_FILE}: empty file or empty line")
    return lines


def open_img2dataset_shards(
    root: str,
    kind: Literal["classification", "retrieval"],
    classnames: Sequence[str] | None = None,
) -> EvalSet:
    """Open vlp's shards at ``root`` for ``kind``.

    Raises EvalDataError, as one line saying what to do, when classification is asked and the
    samples have no ``cls`` member or there are no class names.
    """
    root = root.rstrip("/")
    fs, local = fsspec.core.url_to_fs(root)
    with fs.open(posixpath.join(local, SIZES_FILE), "rt") as handle:
        try:
            sizes = json.load(handle)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{root}/{SIZES_FILE}: not valid JSON ({error})") from None
    shards = [posixpath.join(root, name) for name in sorted(sizes) if sizes[name] > 0]
    if not shards:
        raise EvalDataError(f"{root}/{SIZES_FILE}: no shard holds a sample")
    names = list(classnames) if classnames is not None else None
    if kind == "classification":
        with fsspec.open(shards[0], "rb") as stream:
            first = next(iter_samples(stream, shards[0]), None)
        if first is not None and "cls" not in first.members:
            raise EvalDataError(
                f"{root}: the samples have no 'cls' class label (e.g. {shards[0]} key "
                f"{first.key}); evaluate them with `vlp eval retrieval`, or write shards with "
                "labels from a folder of class subfolders (`vlp shards write FOLDER OUT`)"
            )
        names = names or _classnames(fs, root, local)
        if names is None:
            raise EvalDataError(
                f"{root}: the samples have class labels (cls) but there are no class names; "
                f"give them with --classnames (one per line), or put a {CLASSNAMES_FILE} "
                f"beside {SIZES_FILE}"
            )
    return EvalSet(
        name=posixpath.basename(root),
        source=root,
        kind=kind,
        classnames=names,
        templates=None,
        read=lambda: shard_samples(shards, kind),
    )
