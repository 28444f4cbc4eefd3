"""CLIP_benchmark's webdataset layout, read as an :class:`~evals.eval_set.EvalSet`.

The layout (LAION-AI/CLIP_benchmark ``build_wds_dataset``; written by its
``clip_benchmark_export_wds`` and by :mod:`data_pipelines.clip_benchmark_layout`)::

    ROOT/
        classnames.txt                          one class name per line (classification)
        zeroshot_classification_templates.txt   one template with {c} per line
        dataset_type.txt                        classification (default) | multilabel | retrieval
        test/nshards.txt                        the number of shards of the split
        test/0.tar, test/1.tar, ...             shards {0..nshards-1}.tar, names not zero-padded

A sample holds an image (``webp``, ``png``, ``jpg`` or ``jpeg``, taken in that order) and, by
dataset type, ``cls`` (the class index as text), ``npy`` (a 0/1 vector, multilabel) or ``txt``
(the captions, one per line, retrieval). Text files are read as CB reads them: lines stripped.
A missing label or image member is a broken dataset and raises :class:`EvalDataError` naming
the shard and key; an image that does not decode is counted later, by the batcher.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator
from typing import cast

import fsspec
import numpy as np

from data_pipelines.decode import DATA_ERRORS
from data_pipelines.tario import iter_samples
from evals.eval_set import KINDS, EvalDataError, EvalSet, Kind, RawSample

IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"


def _read_text(path: str) -> str | None:
    """A small text file's content, or None when it does not exist."""
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.isfile(local):
        return None
    with fs.open(local, "rt", encoding="utf-8") as handle:
        return str(handle.read())


def _lines(root: str, name: str) -> list[str] | None:
    """The stripped lines of ``root/name`` (None if absent); an empty line is an error."""
    text = _read_text(posixpath.join(root, name))
    if text is None:
        return None
    lines = [line.strip() for line in text.splitlines()]
    if not lines or not all(lines):
        raise EvalDataError(f"{posixpath.join(root, name)}: empty file or empty line")
    return lines


def is_clip_benchmark_wds(root: str, split: str = "test") -> bool:
    """Whether ``root`` has CLIP_benchmark's webdataset layout for ``split``."""
    return _read_text(posixpath.join(root, split, NSHARDS_FILE)) is not None


def _target(members: dict[str, bytes], kind: Kind, where: str) -> int | list[int] | None:
    member = {"classification": "cls", "multilabel": "npy", "retrieval": "txt"}[kind]
    if member not in members:
        raise EvalDataError(f"{where}: no '{member}' member, which a {kind} dataset needs")
    data = members[member]
    try:
        if kind == "classification":
            return int(data.decode("ascii").strip())
        if kind == "multilabel":
            return [int(v) for v in np.load(io.BytesIO(data), allow_pickle=False).reshape(-1)]
    except (ValueError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{where}: unreadable '{member}' member: {error}") from None
    return None


def shard_samples(shards: list[str], kind: Kind) -> Iterator[RawSample]:
    """The samples of ``shards`` in order, read for ``kind`` (see the module docstring).

    Also reads vlp's own shards (:mod:`evals.img2dataset_layout`), whose members are the same.
    """
    for url in shards:
        try:
            with fsspec.open(url, "rb") as stream:
                for raw in iter_samples(stream, url):
                    where = f"{url} key {raw.key}"
                    image = next((raw.members[m] for m in IMAGE_MEMBERS if m in raw.members), None)
                    if image is None:
                        raise EvalDataError(
                            f"{where}: no image member ({', '.join(IMAGE_MEMBERS)})"
                        )
                    target = _target(raw.members, kind, where)
                    captions: tuple[str, ...] = ()
                    if kind == "retrieval":
                        captions = tuple(raw.members["txt"].decode("utf-8").splitlines())
                    yield RawSample(raw.key, where, image, target, captions)
        except EvalDataError:
            raise
        except DATA_ERRORS as error:
            raise EvalDataError(f"shard {url} cannot be read: {error!r}") from None


def open_clip_benchmark_wds(root: str, split: str = "test") -> EvalSet:
    """Open CLIP_benchmark's webdataset layout at ``root`` (a folder or fsspec URL)."""
    root = root.rstrip("/")
    nshards_text = _read_text(posixpath.join(root, split, NSHARDS_FILE))
    if nshards_text is None:
        raise EvalDataError(
            f"{root}: not CLIP_benchmark's webdataset layout for split '{split}' "
            f"(no {split}/{NSHARDS_FILE})"
        )
    try:
        nshards = int(nshards_text.strip())
    except ValueError:
        raise EvalDataError(f"{root}/{split}/{NSHARDS_FILE}: not a number") from None
    kind_text = (_read_text(posixpath.join(root, TYPE_FILE)) or "classification").strip().lower()
    if kind_text not in KINDS:
        raise EvalDataError(
            f"{root}/{TYPE_FILE}: unknown dataset type {kind_text!r}, expected {KINDS}"
        )
    kind = cast(Kind, kind_text)
    shards = [posixpath.join(root, split, f"{i}.tar") for i in range(nshards)]
    return EvalSet(
        name=f"wds/{posixpath.basename(root)}",
        source=root,
        kind=kind,
        classnames=_lines(root, CLASSNAMES_FILE) if kind != "retrieval" else None,
        templates=_lines(root, TEMPLATES_FILE) if kind != "retrieval" else None,
        read=lambda: shard_samples(shards, kind),
    )
