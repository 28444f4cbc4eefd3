"""Evaluation results as CLIP_benchmark-shaped JSON files, written atomically.

The shape is CLIP_benchmark's ``cli.py`` dump::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": ..., "metrics": {...},
     "language": ...}

NaN (e.g. ``acc5`` with fewer than 5 classes) is written the way ``json.dump`` writes it by
default, and so the way CLIP_benchmark does: as the bare token ``NaN``. Python's ``json`` (and
pandas) read it back as ``float('nan')``, but it is not strict RFC 8259 JSON: strict parsers
(JavaScript's ``JSON.parse``) reject it, and need the NaN replaced (e.g. by ``null``) first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, cast

from vlp.atomic_files import atomic_write_text

REQUIRED_KEYS: tuple[str, ...] = ("dataset", "model", "pretrained", "task", "metrics", "language")


class EvalResult(TypedDict):
    """One evaluation's record, as CLIP_benchmark writes it."""

    dataset: str
    model: str
    pretrained: str
    task: str
    metrics: dict[str, Any]
    language: str


def _metric_value(key: str, value: Any) -> float | int:
    """Coerce one metric (Python/NumPy number, 0-d tensor) to a JSON number, or say which key."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"metric {key!r} must be a number, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from error
    return number


def result_filename(
    *, dataset: str, model: str, pretrained: str, task: str, language: str = "en"
) -> str:
    """CLIP_benchmark's default output name ``{dataset}_{pretrained}_{model}_{language}_{task}.json``.

    As CB does: a ``wds/`` prefix is dropped and ``/`` in the dataset becomes ``_``; a
    ``pretrained`` that is an existing file contributes its basename only. Unlike CB, a ``/`` or
    ``:`` left in ``pretrained`` or ``model`` (a checkpoint directory, ``local-dir:PATH``) also
    becomes ``_``: CB would write into (possibly missing) subfolders named after the path, and a
    ``:`` is refused by some file systems and tools (SMB shares, Windows, ``scp``).
    """
    dataset_slug = dataset.removeprefix("wds/").replace("/", "_")
    pretrained_slug = os.path.basename(pretrained) if os.path.isfile(pretrained) else pretrained
    return f"{dataset_slug}_{_flat(pretrained_slug)}_{_flat(model)}_{language}_{task}.json"


def _flat(text: str) -> str:
    return text.replace("/", "_").replace(":", "_")


def write_result(
    path: str | os.PathLike[str],
    *,
    dataset: str,
    model: str,
    pretrained: str,
    task: str,
    metrics: Mapping[str, Any],
    language: str = "en",
    **extra: Any,
) -> Path:
    """Write one result JSON atomically and durably (:func:`vlp.atomic_files.atomic_write_text`:
    a temporary file in the same folder, fsync, rename), readable as a plain ``open()`` would
    make it (0644 under umask 0022).

    Why atomic: a reader (a results table, a sweep's skip-existing check) never sees a half
    written file, even if the job is killed mid-write. Metrics are coerced to plain numbers;
    NaN is written as ``NaN`` like ``json.dump``'s default (see the module docstring).
    ``extra`` keywords add JSON-able top-level keys after CB's (as CB's ``classnames`` dump
    does), e.g. how many images were left out.
    Returns the path written; parent folders are created.
    """
    target = Path(path)
    record: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": {k: _metric_value(k, v) for k, v in metrics.items()},
        "language": language,
    }
    record.update(extra)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(record, indent=2) + "\n", durable=True)
    return target


def read_result(path: str | os.PathLike[str]) -> EvalResult:
    """Read a result JSON (ours or CLIP_benchmark's); ``NaN`` comes back as ``float('nan')``.

    Extra keys (e.g. ``classnames``) are kept in the returned dict.

    Raises ValueError naming the file and the missing keys when it is not result-shaped.
    """
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"{path}: not a CLIP_benchmark-shaped result, missing keys {missing}")
    if not isinstance(record["metrics"], dict):
        raise ValueError(f"{path}: 'metrics' must be an object")
    return cast(EvalResult, record)
