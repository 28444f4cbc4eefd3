"""Read an image-text source into the sample dicts :func:`~data_pipelines.write.write_shards` takes.

Sources, told apart by their suffix (``vlp shards write``):

- a folder with one subfolder per class (torchvision's ImageFolder layout): the class names are
  the subfolder names (spaces allowed), ``cls`` is the index in their sorted order and the
  caption comes from templates such as ``"a photo of a {c}."``;
- a table, ``.csv``, ``.tsv``, ``.parquet`` or ``.jsonl``: one row per sample with an image
  column (a local path, relative to the table's folder unless absolute, or an fsspec URL) and a
  caption column, named by the caller or guessed (:mod:`data_pipelines.columns`). Every other non-empty column becomes a member of the sample: text as
  ``<column>.txt``, anything else (lists, objects, numbers) as ``<column>.json``.

Images are not opened here: the writer reads them in its worker processes. Keys are the 9-digit
position of the image or row in the source, so a key leads back to its row even when rows are
skipped. A row without a caption or image reference is skipped and passed to ``on_skip`` with
its file and line; a source that cannot be read as asked (unknown suffix, missing column,
invalid JSON line) raises :class:`SourceError` naming the file, line or column.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import fsspec
import pyarrow.parquet as pq

from data_pipelines.columns import ColumnError, find_column
from data_pipelines.prepare import Skipped

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
DEFAULT_TEMPLATE = "a photo of a {c}."

Sample = dict[str, Any]
OnSkip = Callable[[Skipped], None] | None


class SourceError(ValueError):
    """A source that cannot be read as asked; the message names the file, line or column."""


def _skip(
    on_skip: OnSkip, where: str, reason: str, stage: Literal["caption", "read"] = "caption"
) -> None:
    if on_skip is None:
        raise SourceError(f"{where}: {reason}")
    on_skip(Skipped(where, reason, stage))


def class_names(folder: str) -> list[str]:
    """The class names of an ImageFolder-style folder: its subfolder names, sorted.

    Raises:
        SourceError: no class subfolders, or images lying directly in ``folder``.
    """
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    stray = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
    if stray:
        raise SourceError(
            f"{os.path.join(folder, stray[0])}: images must be inside class subfolders "
            f"(FOLDER/<class name>/<image>), {len(stray)} are not"
        )
    names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not names:
        raise SourceError(f"{folder}: no class subfolders (expected FOLDER/<class name>/<image>)")
    return names


def _images_under(root: str) -> list[str]:
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found.extend(os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found)


def _check_templates(templates: Sequence[str]) -> None:
    if not templates:
        raise SourceError("give at least one caption template, e.g. 'a photo of a {c}.'")
    for template in templates:
        try:
            template.format(c="")
        except (KeyError, IndexError, ValueError) as error:
            raise SourceError(
                f"caption template {template!r} is not valid: use {{c}} for the class name "
                f"and {{{{ }}}} for literal braces ({error!r})"
            ) from None
        if "{c}" not in template:
            raise SourceError(f"caption template {template!r} does not contain {{c}}")


def read_folder(folder: str, templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> Iterator[Sample]:
    """Samples of an ImageFolder-style folder, class by class, images in path order.

    The caption of the i-th image is ``templates[i % len(templates)]`` with ``{c}`` replaced
    by its class name: several templates are used in turn, deterministically.
    """
    _check_templates(templates)
    names = class_names(folder)
    if not any(_images_under(os.path.join(folder, name)) for name in names):
        raise SourceError(
            f"{folder}: no images in its {len(names)} class subfolders (expected "
            f"FOLDER/<class name>/<image> with suffix {', '.join(IMAGE_SUFFIXES)})"
        )
    return _folder_samples(folder, names, templates)


def _folder_samples(folder: str, names: list[str], templates: Sequence[str]) -> Iterator[Sample]:
    index = 0
    for cls, name in enumerate(names):
        for path in _images_under(os.path.join(folder, name)):
            yield {
                "key": f"{index:09d}",
                "image": path,
                "txt": templates[index % len(templates)].format(c=name),
                "cls": cls,
                "json": {"class": name, "path": os.path.relpath(path, folder)},
            }
            index += 1


def _member_suffix(source: str, column: str, value: Any) -> str:
    if not column or "/" in column or column.startswith((".", "_")):
        raise SourceError(f"{source}: column {column!r} cannot name a sample member")
    return f"{column}.txt" if isinstance(value, str) else f"{column}.json"


def _resolve(ref: str, base: str) -> str:
    """A table's image path: relative ones are relative to the table's folder."""
    if "://" in ref or os.path.isabs(ref) or ref.startswith("pipe:"):
        return ref
    return posixpath.join(base, ref)


def _table_sample(
    record: dict[str, Any],
    index: int,
    where: str,
    source: str,
    columns: tuple[str, str],
    on_skip: OnSkip,
) -> Sample | None:
    """One row as a sample, or None (reported to ``on_skip``) without image or caption."""
    image_column, caption_column = columns
    image, caption = record.get(image_column), record.get(caption_column)
    if not isinstance(image, str) or not image:
        reason = f"column {image_column!r} holds no image path or URL: {image!r:.40}"
        _skip(on_skip, where, reason, "read")
        return None
    if caption is None:
        _skip(on_skip, where, f"missing caption in column {caption_column!r}")
        return None
    if not isinstance(caption, str):
        _skip(on_skip, where, f"caption is not text: {caption!r}")
        return None
    if not caption.strip():
        _skip(on_skip, where, "empty caption")
        return None
    sample: Sample = {
        "key": f"{index:09d}",
        "image": _resolve(image, posixpath.dirname(source)),
        "txt": caption,
        "json": {"url": image},
    }
    for column, value in record.items():
        if column not in columns and value is not None and value != "":
            sample[_member_suffix(source, column, value)] = value
    return sample


def _check_columns(source: str, present: Sequence[str], columns: tuple[str, str]) -> None:
    for column in columns:
        if column not in present:
            raise SourceError(
                f"{source}: no column {column!r} (columns: {', '.join(map(repr, present))}); "
                "choose it with --image-column / --caption-column"
            )


def _csv_rows(source: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with fsspec.open(source, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            where = f"{source} line {reader.line_num}"
            if None in row:
                raise SourceError(f"{where}: more fields than the header has columns")
            yield where, row


def _csv_header(source: str, delimiter: str) -> list[str]:
    with fsspec.open(source, "rt", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if header is None:
        raise SourceError(f"{source}: empty file, expected a header row")
    return header


def _parquet_rows(source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    row = 0
    with fsspec.open(source, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{source} row {row}", record
                row += 1


def _jsonl_rows(source: str, columns: tuple[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    with fsspec.open(source, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{source} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
            _check_columns(where, list(record), columns)
            yield where, record


def _first_jsonl_keys(source: str) -> list[str]:
    """The keys of a JSONL file's first record, to guess its columns from (none if unreadable)."""
    with fsspec.open(source, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return []
                return list(record) if isinstance(record, dict) else []
    return []


def _table_columns(
    source: str, header: Sequence[str], image_column: str | None, caption_column: str | None
) -> tuple[str, str]:
    """The image and caption columns: given, else guessed from ``header`` (see columns.py)."""
    try:
        image = find_column(header, "image", image_column, source)
        caption = find_column(header, "caption", caption_column, source)
    except ColumnError as error:
        raise SourceError(str(error)) from None
    assert image is not None and caption is not None  # required=True
    return image, caption


def read_table(
    source: str,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    on_skip: OnSkip = None,
) -> Iterator[Sample]:
    """Samples of a ``.csv``/``.tsv``/``.parquet``/``.jsonl`` table (local path or fsspec URL).

    Without a column name, the column is guessed from the accepted names
    (:data:`data_pipelines.columns.COLUMNS`; a JSONL file's first record stands for its header).
    The columns of CSV, TSV and Parquet files are checked before the first row is read; a
    JSONL record lacking one raises when it is reached. Without ``on_skip`` a row without
    image or caption raises :class:`SourceError`.
    """
    suffix = os.path.splitext(source)[1].lower()
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{source}: no such file")
    rows: Iterator[tuple[str, dict[str, Any]]]
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        columns = _table_columns(
            source, _csv_header(source, delimiter), image_column, caption_column
        )
        rows = _csv_rows(source, delimiter)
    elif suffix == ".parquet":
        with fsspec.open(source, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
        columns = _table_columns(source, names, image_column, caption_column)
        rows = _parquet_rows(source)
    elif suffix == ".jsonl":
        keys = _first_jsonl_keys(source)
        columns = (
            _table_columns(source, keys, image_column, caption_column)
            if keys
            else (image_column or "image", caption_column or "caption")
        )
        rows = _jsonl_rows(source, columns)
    else:
        raise SourceError(f"{source}: unknown table suffix {suffix!r}, expected {TABLE_SUFFIXES}")
    return _table_samples(rows, source, columns, on_skip)


def _table_samples(
    rows: Iterator[tuple[str, dict[str, Any]]],
    source: str,
    columns: tuple[str, str],
    on_skip: OnSkip,
) -> Iterator[Sample]:
    for index, (where, record) in enumerate(rows):
        sample = _table_sample(record, index, where, source, columns, on_skip)
        if sample is not None:
            yield sample


def read_source(
    source: str,
    *,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    image_column: str | None = None,
    caption_column: str | None = None,
    on_skip: OnSkip = None,
    shuffle: bool = True,
    seed: int = 0,
) -> Iterator[Sample]:
    """Samples of ``source``: a class-folder tree (:func:`read_folder`, with ``templates``) or
    a table (:func:`read_table`, with the column names), told apart by the suffix.

    ``shuffle`` (the default) returns them in a seeded random order, so that shards written
    from a folder (class by class) or a sorted table each hold many classes: a stream whose
    shuffle buffer holds about one shard would otherwise make batches of one or two classes.
    The order depends on ``seed`` only (not on how many processes encode the images); the
    samples are listed in memory first (folders: paths; tables: the rows). Keys keep the
    source order.

    Raises:
        SourceError: neither a folder nor a file with a known suffix, or a bad layout/column.
        FileNotFoundError: a table that does not exist.
    """
    samples: Iterator[Sample]
    if os.path.isdir(source):
        samples = read_folder(source, templates)
    elif os.path.splitext(source)[1].lower() in TABLE_SUFFIXES:
        samples = read_table(
            source, image_column=image_column, caption_column=caption_column, on_skip=on_skip
        )
    else:
        raise SourceError(
            f"{source}: not a folder and not a {', '.join(TABLE_SUFFIXES)} file; "
            "SOURCE is told apart by its suffix"
        )
    if not shuffle:
        return samples
    listed = list(samples)
    random.Random(seed).shuffle(listed)
    return iter(listed)
