"""The summary table `vlp eval` prints: one row per metric, one column per dataset, footnotes.

A footnote explains a number that looks wrong but is CLIP_benchmark's convention, and is printed
only when such a number is in the table:

- ``acc5`` is NaN for a dataset with fewer than 5 classes (top-5 of 3 classes means nothing);
- a retrieval rank counts ties optimistically (1 + the candidates scoring strictly higher, see
  :func:`evals.retrieval.retrieval_metrics`), so an untrained model whose scores all tie gets a
  mean rank of 1.0 beside a recall@1 of 0.06. The footnote applies when recall@1 is lower than
  the ranks allow without ties: a mean rank m means at least a share ``2 - m`` of the queries
  rank first, a median rank of 1 at least half of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

ACC5_NOTE = "acc5 is NaN where a dataset has fewer than 5 classes (as in CLIP_benchmark)."
RANK_NOTE = (
    "ranks count tied scores optimistically (1 + the candidates scoring strictly higher), so "
    "with many ties a rank near 1 can sit beside a low recall@1."
)


def _ties_show(metrics: Mapping[str, float | int | str]) -> bool:
    """Whether recall@1 is lower than the mean or median rank allows without ties."""
    for side in ("image", "text"):
        recall = metrics.get(f"{side}_retrieval_recall@1")
        mean = metrics.get(f"{side}_retrieval_mean_rank")
        median = metrics.get(f"{side}_retrieval_median_rank")
        if not isinstance(recall, float) or not isinstance(mean, float) or math.isnan(mean):
            continue
        if recall < 2.0 - mean - 1e-6 or (median == 1.0 and recall < 0.5 - 1e-6):
            return True
    return False


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _cell(value: float | int | str | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(results: Sequence[tuple[str, Mapping[str, float | int | str]]]) -> str:
    """``results`` (dataset name, metrics) as a table of metrics x datasets, with footnotes."""
    keys = list(dict.fromkeys(key for _, metrics in results for key in metrics))
    notes: dict[str, tuple[str, str]] = {}  # metric -> (marker, note)
    if any(_is_nan(metrics.get("acc5")) for _, metrics in results):
        notes["acc5"] = ("[1]", ACC5_NOTE)
    if any(_ties_show(metrics) for _, metrics in results):
        marker = f"[{len(notes) + 1}]"
        for key in keys:
            if key.endswith(("_mean_rank", "_median_rank")):
                notes[key] = (marker, RANK_NOTE)
    labels = [f"{key} {notes[key][0]}" if key in notes else key for key in keys]
    first = max([len("metric"), *map(len, labels)]) + 2
    widths = [max(10, len(name)) + 2 for name, _ in results]
    lines = [
        "metric".ljust(first)
        + "".join(n.rjust(w) for (n, _), w in zip(results, widths, strict=True))
    ]
    lines.append("-" * len(lines[0]))
    for key, label in zip(keys, labels, strict=True):
        cells = (
            _cell(metrics.get(key)).rjust(w)
            for (_, metrics), w in zip(results, widths, strict=True)
        )
        lines.append(label.ljust(first) + "".join(cells))
    lines.extend(f"{marker} {note}" for marker, note in dict(notes.values()).items())
    return "\n".join(lines)
