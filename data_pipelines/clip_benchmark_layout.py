"""Write an image folder or a CSV as a dataset in CLIP_benchmark's webdataset layout.

The layout is what CLIP_benchmark's ``build_wds_dataset`` reads (``--dataset wds/NAME
--dataset_root OUT``) and what :mod:`evals.wds_layout` reads::

    OUT/classnames.txt                            class names, one per line (classification)
    OUT/zeroshot_classification_templates.txt     templates with {c}, one per line
    OUT/dataset_type.txt                          classification | retrieval
    OUT/<split>/nshards.txt                       number of shards
    OUT/<split>/0.tar, 1.tar, ...                 shards, names not zero-padded

Samples hold the image and ``cls`` (classification) or ``txt`` with the image's captions one
per line (retrieval; a newline inside a caption is written as the two characters ``\\n``, as
CLIP_benchmark's converter does). The shards are written by :func:`data_pipelines.write.
write_shards` (the same image checks, parallel encoding and atomic shard files as training
shards), then renamed to CLIP_benchmark's names; its ``sizes.json`` and ``*_stats.json`` are
removed, since they name the shards by their old names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipelines.labelled_tables import LabelledTable, read_labelled_table
from data_pipelines.prepare import Skipped
from data_pipelines.sources import DEFAULT_TEMPLATE, class_names, read_folder
from data_pipelines.write import write_shards


@dataclass
class WrittenLayout:
    """What was written: the kind, the sample and shard counts, the class names, the skips."""

    root: Path
    split: str
    kind: str
    samples: int
    shards: int
    classnames: list[str] | None
    skipped: list[Skipped] = field(default_factory=list)


def _table_samples(
    source: str, classnames: Sequence[str] | None, columns: tuple[str | None, ...]
) -> tuple[LabelledTable, Iterator[dict[str, Any]]]:
    image_column, label_column, caption_column = columns
    table = read_labelled_table(
        source,
        classnames=classnames,
        image_column=image_column,
        label_column=label_column,
        caption_column=caption_column,
    )
    samples: Iterator[dict[str, Any]]
    if table.kind == "retrieval":
        samples = (
            {
                "key": row.key,
                "image": row.image,
                "txt": "\n".join(c.replace("\n", "\\n") for c in row.captions),
            }
            for row in table.rows
        )
    else:
        names = table.classnames or []
        samples = (
            {"key": row.key, "image": row.image, "txt": names[label], "cls": label}
            for row in table.rows
            if (label := row.label) is not None
        )
    return table, samples


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def write_clip_benchmark_layout(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "test",
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    classnames: Sequence[str] | None = None,
    image_format: str = "jpg",
    quality: int = 95,
    samples_per_shard: int = 10_000,
    max_side: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
) -> WrittenLayout:
    """Write ``source`` (a folder of class subfolders, or a CSV/TSV) to ``out`` for ``split``.

    ``templates`` go to ``zeroshot_classification_templates.txt`` (classification only).
    Images already in ``image_format`` are stored byte for byte; others are re-encoded (jpg and
    webp at ``quality``, so lossy: use png to keep a folder of PNGs exact).
    ``classnames`` name a CSV's class indices (or fix the order of its class-name labels);
    its columns are guessed unless named (:mod:`data_pipelines.columns`).
    Images that cannot be read or decoded are left out and listed in the result's
    ``skipped``. Other splits already in ``out`` are kept; the split itself must be empty
    unless ``overwrite``.

    Raises:
        data_pipelines.sources.SourceError: a source that cannot be read as asked.
        FileExistsError: the split folder holds files and ``overwrite`` is False.
        ValueError: no sample could be written.
    """
    text = os.fspath(source)
    root = Path(out)
    names: list[str] | None
    if os.path.isdir(text):
        kind, names = "classification", class_names(text)
        samples: Iterable[dict[str, Any]] = read_folder(text, [DEFAULT_TEMPLATE])
    else:
        columns = (image_column, label_column, caption_column)
        table, samples = _table_samples(text, classnames, columns)
        kind, names = table.kind, table.classnames
    skipped: list[Skipped] = []
    split_dir = root / split
    paths = write_shards(
        samples,
        split_dir,
        samples_per_shard=samples_per_shard,
        image_format=image_format,
        quality=quality,
        overwrite=overwrite,
        max_side=max_side,
        workers=workers,
        on_skip=skipped.append,
    )
    sizes = split_dir / "sizes.json"
    count = sum(json.loads(sizes.read_text()).values())
    sizes.unlink()
    for index, path in enumerate(paths):
        os.replace(path, split_dir / f"{index}.tar")
        (split_dir / f"{index:05d}_stats.json").unlink()
    (split_dir / "nshards.txt").write_text(f"{len(paths)}\n")
    _write_lines(root / "dataset_type.txt", [kind])
    if kind == "classification":
        _write_lines(root / "classnames.txt", names or [])
        _write_lines(root / "zeroshot_classification_templates.txt", templates)
    return WrittenLayout(root, split, kind, count, len(paths), names, skipped)
