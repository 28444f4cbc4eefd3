"""Evaluation datasets: any supported layout by path, and small labelled shard sets in memory.

:func:`open_eval_set` recognises CLIP_benchmark's webdataset layout (:mod:`evals.wds_layout`:
``{split}/nshards.txt``), vlp's own shards (:mod:`evals.img2dataset_layout`: ``*.tar`` and
``sizes.json``), a folder of class subfolders and a CSV/TSV table (:mod:`evals.file_sets`).
:func:`load_labelled_shards` reads vlp's own held-out shards (``cls`` + image + ``txt``) into
memory for the evaluators that run inside training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import webdataset as wds
from PIL import Image

from data_pipelines.labelled_tables import SUFFIXES as TABLE_SUFFIXES
from data_pipelines.write import SIZES_FILE
from evals.eval_set import EvalDataError, EvalSet
from evals.file_sets import open_csv, open_image_folder
from evals.img2dataset_layout import is_img2dataset_layout, open_img2dataset_shards
from evals.wds_layout import NSHARDS_FILE, is_clip_benchmark_wds, open_clip_benchmark_wds


def open_eval_set(
    path: str | os.PathLike[str],
    *,
    split: str = "test",
    classnames: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    task: Literal["classification", "retrieval"] | None = None,
) -> EvalSet:
    """Open the dataset at ``path``, recognising its layout, for ``task`` where it has both.

    ``split`` selects the split of a CLIP_benchmark webdataset root. ``task`` says whether vlp's
    own shards (labels and captions) and a table with a label and a caption column are read
    for classification (the default) or retrieval. ``classnames`` replace the
    dataset's own (its ``classnames.txt`` or folder names); CSV labels are looked up in them.
    The column names only apply to CSV tables.

    Raises EvalDataError naming the path when it is no supported dataset.
    """
    text = os.fspath(path)
    if "://" in text or os.path.isdir(text):
        if is_clip_benchmark_wds(text, split):
            eval_set = open_clip_benchmark_wds(text, split)
        elif "://" not in text and any(
            os.path.isfile(os.path.join(text, entry, NSHARDS_FILE)) for entry in os.listdir(text)
        ):
            raise EvalDataError(f"{text}: CLIP_benchmark webdataset without a '{split}' split")
        elif is_img2dataset_layout(text):
            eval_set = open_img2dataset_shards(text, task or "classification", classnames)
        elif "://" in text:
            raise EvalDataError(
                f"{text}: neither CLIP_benchmark's webdataset layout ({split}/{NSHARDS_FILE}) "
                f"nor vlp's shards (*.tar and {SIZES_FILE})"
            )
        elif any(entry.endswith(".tar") for entry in os.listdir(text)):
            raise EvalDataError(
                f"{text}: .tar shards without {SIZES_FILE} or {split}/{NSHARDS_FILE}; vlp reads "
                "the shards `vlp shards write` writes and CLIP_benchmark's webdataset layout"
            )
        else:
            eval_set = open_image_folder(text)
    elif os.path.isfile(text) and text.lower().endswith(TABLE_SUFFIXES):
        return open_csv(
            text,
            classnames=classnames,
            image_column=image_column,
            label_column=label_column,
            caption_column=caption_column,
            kind=task,
        )
    else:
        raise EvalDataError(
            f"'{text}' is not a dataset: expected a CLIP_benchmark webdataset root "
            f"({split}/{NSHARDS_FILE}), vlp's shards (*.tar and {SIZES_FILE}), a folder of "
            "class subfolders, or a .csv/.tsv table"
        )
    if classnames is not None:
        if eval_set.classnames is not None and len(eval_set.classnames) != len(classnames):
            raise EvalDataError(
                f"{len(classnames)} class names were given but {text} has "
                f"{len(eval_set.classnames)} classes; the class names and the labels disagree"
            )
        eval_set.classnames = list(classnames)
    return eval_set


@dataclass
class LabelledSet:
    """Preprocessed images with class labels and one caption each, held in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    keys: list[str]


def load_labelled_shards(
    urls: Sequence[str],
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    limit: int | None = None,
) -> LabelledSet:
    """Read every sample of ``urls`` in order (no shuffling, no rank split) into memory.

    Meant for small held-out sets (the demo's, smoke evals); large benchmarks stream instead.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.to_tuple("__key__", "jpg;jpeg;png;webp", "cls", "txt"),
    )
    keys, images, labels, captions = [], [], [], []
    for key, image, label, caption in pipeline:
        keys.append(key)
        images.append(preprocess(image))
        labels.append(int(label))
        captions.append(caption)
        if limit is not None and len(keys) >= limit:
            break
    if not keys:
        raise ValueError(f"no labelled samples (image + cls + txt) in {list(urls)[:3]}...")
    return LabelledSet(torch.stack(images), torch.tensor(labels), captions, keys)
