"""Image folders and CSV tables as :class:`~evals.eval_set.EvalSet`, read with the rules of
``vlp shards write`` (:mod:`data_pipelines.sources`, :mod:`data_pipelines.labelled_tables`).

- An **image folder** has one subfolder per class (names may contain spaces); the class names
  are the subfolder names in sorted order and a sample's label is its folder's index.
- A **CSV/TSV** has an image column and a label column (classification) or a caption column
  (retrieval); see :mod:`data_pipelines.labelled_tables` for the column names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from data_pipelines.labelled_tables import read_labelled_table
from data_pipelines.sources import SourceError, class_names, read_folder
from evals.eval_set import EvalDataError, EvalSet, RawSample


def open_image_folder(folder: str) -> EvalSet:
    """A folder of class subfolders (torchvision's ImageFolder layout)."""
    try:
        names = class_names(folder)
    except SourceError as error:
        raise EvalDataError(str(error)) from None

    def read() -> Iterator[RawSample]:
        try:
            samples = read_folder(folder)
        except SourceError as error:  # every class folder is empty
            raise EvalDataError(str(error)) from None
        for sample in samples:
            path = str(sample["image"])
            yield RawSample(sample["key"], path, path, int(sample["cls"]))

    return EvalSet(Path(folder).name, folder, "classification", names, None, read)


def open_csv(
    source: str,
    *,
    classnames: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    kind: Literal["classification", "retrieval"] | None = None,
) -> EvalSet:
    """A CSV/TSV of images with labels (classification) or captions (retrieval).

    ``kind`` picks the label or the caption column of a table that has both.
    """
    try:
        table = read_labelled_table(
            source,
            classnames=classnames,
            image_column=image_column,
            label_column=label_column,
            caption_column=caption_column,
            kind=kind,
        )
    except (SourceError, FileNotFoundError) as error:
        raise EvalDataError(str(error)) from None
    samples = [
        RawSample(row.key, row.image, row.image, row.label, row.captions) for row in table.rows
    ]
    return EvalSet(
        Path(source).stem, source, table.kind, table.classnames, None, lambda: iter(samples)
    )
