"""CSV/TSV tables of images with a class label or a caption, as evaluation datasets use them.

A table has an image column (a path, relative to the table's folder unless absolute) and either
a label column (classification) or a caption column (retrieval; rows naming the same image give
it several captions, in order). Columns are found by the accepted names of
:mod:`data_pipelines.columns` unless given; a table with both a label and a caption column is
read as the ``kind`` asked for (classification when not said). Labels are class names, or class
indices when the class names are given. Rows are read with :func:`data_pipelines.sources.read_table`'s rules.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import fsspec

from data_pipelines.columns import COLUMNS, ColumnError, find_column
from data_pipelines.sources import SourceError, read_table

SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class TableRow:
    """One image of the table: its 9-digit key (first row position), path and label/captions."""

    key: str
    image: str
    label: int | None
    captions: tuple[str, ...]


@dataclass
class LabelledTable:
    """The images of a table, and its class names (classification) or None (retrieval)."""

    kind: Literal["classification", "retrieval"]
    classnames: list[str] | None
    rows: list[TableRow]


def _header(source: str, delimiter: str) -> list[str]:
    with fsspec.open(source, "rt", encoding="utf-8", newline="") as handle:
        return next(csv.reader(handle, delimiter=delimiter), [])


def _label_index(label: str, classnames: list[str], where: str) -> int:
    if label in classnames:
        return classnames.index(label)
    if label.strip().isdigit():
        if int(label) >= len(classnames):
            raise SourceError(f"{where}: label {label} but there are {len(classnames)} class names")
        return int(label)
    raise SourceError(f"{where}: label {label!r} is neither a class name nor a class index")


def read_labelled_table(
    source: str,
    *,
    classnames: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    kind: Literal["classification", "retrieval"] | None = None,
) -> LabelledTable:
    """Read a whole table (see the module docstring) as ``kind``, or as its columns say.

    Without ``classnames`` the class names are the distinct labels, sorted; labels that are
    all integers then need the names given. Raises SourceError naming the file, row or column.
    """
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in SUFFIXES:
        raise SourceError(f"{source}: expected a {' or '.join(SUFFIXES)} file")
    header = _header(source, "\t" if suffix == ".tsv" else ",")
    try:
        image = find_column(header, "image", image_column, source)
        label = (
            None
            if kind == "retrieval"
            else find_column(header, "label", label_column, source, required=False)
        )
        caption = (
            find_column(header, "caption", caption_column, source, required=kind == "retrieval")
            if label is None
            else None
        )
    except ColumnError as error:
        raise SourceError(str(error)) from None
    if kind == "classification" and label is None:
        raise SourceError(
            f"{source}: no label column for classification (expected one of "
            f"{', '.join(COLUMNS['label'])}; columns: {', '.join(map(repr, header))}); name it "
            "with --label-column"
        )
    value = label if label is not None else caption
    if image is None or value is None:
        raise SourceError(
            f"{source}: needs an image column and a label ({', '.join(COLUMNS['label'])}) or "
            f"caption ({', '.join(COLUMNS['caption'])}) column; columns: "
            f"{', '.join(map(repr, header))}"
        )
    records = list(read_table(source, image_column=image, caption_column=value))
    if label is None:
        captions: dict[str, tuple[str, list[str]]] = {}
        for record in records:
            captions.setdefault(str(record["image"]), (record["key"], []))[1].append(record["txt"])
        rows = [TableRow(key, path, None, tuple(texts)) for path, (key, texts) in captions.items()]
        return LabelledTable("retrieval", None, rows)
    labels = [str(record["txt"]) for record in records]
    if classnames is None and all(text.strip().isdigit() for text in labels):
        raise SourceError(f"{source}: the labels are class indices; give the class names")
    names = list(classnames) if classnames is not None else sorted(set(labels))
    rows = [
        TableRow(
            record["key"],
            str(record["image"]),
            _label_index(text, names, f"{source} row {int(record['key']) + 1}"),
            (),
        )
        for record, text in zip(records, labels, strict=True)
    ]
    return LabelledTable("classification", names, rows)
