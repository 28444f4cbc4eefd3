"""PNG figures where a person would rather look than read numbers (docs/architecture.md §6).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never
through ``pyplot``: no screen is needed, no global backend is switched, and no figure is left
open in pyplot's registry by a long-running job.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from evals.zeroshot import average_precision_per_class

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_RECALL_KEY = re.compile(r"^(image|text)_retrieval_recall@(\d+)$")
_MAX_ANNOTATED_CLASSES = 20
_MAX_LABELLED_CLASSES = 60


def _figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches. matplotlib is imported here, at the first
    figure, not with this module: every training process imports it, few of them draw."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``figure`` to a PNG at ``path`` (parents created) with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(target, format="png", dpi=100)
    return target


def confusion_matrix(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Counts [C, C]: row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def plot_confusion_matrix(
    logits_or_preds: Tensor,
    targets: Tensor,
    classnames: Sequence[str],
    path: str | os.PathLike[str],
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Plot the confusion matrix of a single-label classification to a PNG; return its path.

    ``logits_or_preds``: logits [N, C] (their argmax is taken) or predicted indices [N].
    ``normalize`` divides each row by its count, so the diagonal reads as per-class recall.
    Cells are annotated up to 20 classes and tick-labelled up to 60, beyond that they would
    only be ink.
    """
    predictions = logits_or_preds.detach().cpu()
    if predictions.ndim == 2:
        predictions = predictions.argmax(dim=1)
    targets = targets.detach().cpu()
    if predictions.shape != targets.shape or predictions.ndim != 1:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must "
            "both be [N]"
        )
    num_classes = len(classnames)
    if num_classes == 0:
        raise ValueError("classnames is empty")
    out_of_range = (targets < 0) | (targets >= num_classes) | (predictions < 0)
    out_of_range |= predictions >= num_classes
    if bool(out_of_range.any()):
        raise ValueError(f"class indices must lie in [0, {num_classes}) = len(classnames)")
    counts = confusion_matrix(predictions, targets, num_classes).double()
    shown = counts / counts.sum(dim=1, keepdim=True).clamp(min=1) if normalize else counts

    side = min(4.0 + 0.35 * num_classes, 24.0)
    figure = _figure(side + 1.5, side)
    axes = figure.add_subplot()
    image = axes.imshow(shown.numpy(), cmap="Blues", vmin=0.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion"))
    if num_classes <= _MAX_LABELLED_CLASSES:
        ticks = list(range(num_classes))
        axes.set_xticks(ticks, labels=list(classnames), rotation=90)
        axes.set_yticks(ticks, labels=list(classnames))
    if num_classes <= _MAX_ANNOTATED_CLASSES:
        threshold = float(shown.max()) / 2
        for row in range(num_classes):
            for col in range(num_classes):
                value = float(shown[row, col])
                axes.text(
                    col,
                    row,
                    f"{value:.2f}" if normalize else f"{int(value)}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > threshold else "black",
                )
    figure.tight_layout()
    return _save(figure, path)


def plot_per_class(
    values: Sequence[float],
    classnames: Sequence[str],
    path: str | os.PathLike[str],
    *,
    ylabel: str,
    title: str | None = None,
) -> Path:
    """Plot one value per class (recall, average precision) as bars, worst class first.

    Why sorted: with many classes (where a confusion matrix is unreadable) the classes that
    fail are what a person looks for. Class names label the bars up to 60 classes.
    """
    if len(values) != len(classnames) or len(values) == 0:
        raise ValueError(f"{len(values)} values for {len(classnames)} class names")
    order = sorted(range(len(values)), key=lambda i: float(values[i]))
    figure = _figure(min(4.0 + 0.2 * len(values), 24.0), 4.5)
    axes = figure.add_subplot()
    axes.bar(range(len(order)), [float(values[i]) for i in order], color="tab:blue")
    if len(values) <= _MAX_LABELLED_CLASSES:
        axes.set_xticks(range(len(order)), labels=[classnames[i] for i in order], rotation=90)
    else:
        axes.set_xlabel(f"{len(values)} classes, sorted")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_title(title or f"{ylabel} per class")
    figure.tight_layout()
    return _save(figure, path)


def plot_classification(
    logits: Tensor, targets: Tensor, classnames: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """The figure that suits a classification result: per-class average precision for
    multilabel targets [N, C], a confusion matrix up to 60 classes, else per-class recall.
    """
    if targets.ndim == 2:
        ap = average_precision_per_class(logits.float().cpu(), targets.cpu()).nan_to_num(0.0)
        return plot_per_class(ap.tolist(), classnames, path, ylabel="average precision")
    if len(classnames) <= _MAX_LABELLED_CLASSES:
        return plot_confusion_matrix(logits, targets, classnames, path)
    predictions = logits.argmax(dim=1).cpu()
    counts = confusion_matrix(predictions, targets.cpu(), len(classnames)).double()
    recall = counts.diagonal() / counts.sum(dim=1).clamp(min=1)
    return plot_per_class(recall.tolist(), classnames, path, ylabel="recall")


def plot_recall_at_k(
    metrics: Mapping[str, float], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Plot recall@k against k for image and text retrieval (keys as ``retrieval_metrics``).

    Other keys are ignored; raises ValueError when no ``*_retrieval_recall@k`` key is present.
    """
    curves: dict[str, list[tuple[int, float]]] = {"image": [], "text": []}
    for key, value in metrics.items():
        match = _RECALL_KEY.match(key)
        if match:
            curves[match.group(1)].append((int(match.group(2)), float(value)))
    if not any(curves.values()):
        raise ValueError(
            "metrics has no 'image_retrieval_recall@k' / 'text_retrieval_recall@k' keys; "
            f"got {sorted(metrics)}"
        )
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    labels = {"image": "image retrieval (text → image)", "text": "text retrieval (image → text)"}
    for name, points in curves.items():
        if points:
            ks, recalls = zip(*sorted(points), strict=True)
            axes.plot(ks, recalls, marker="o", label=labels[name])
    axes.set_xscale("log")
    ticks = sorted({k for points in curves.values() for k, _ in points})
    axes.set_xticks(ticks, labels=[str(k) for k in ticks])  # 1, 5, 10, not 10^0, 10^1
    axes.minorticks_off()
    axes.set_xlabel("k")
    axes.set_ylabel("recall@k")
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(title or "retrieval recall@k")
    figure.tight_layout()
    return _save(figure, path)


def plot_retrieval_grid(
    queries: Sequence[tuple[str, Sequence[tuple[Image.Image, bool]]]],
    path: str | os.PathLike[str],
) -> Path:
    """A row per text query: its caption, then its top retrieved images (PIL), the correct
    ones framed in green and the others in red."""
    if not queries:
        raise ValueError("no retrieval queries to draw")
    columns = max(len(images) for _, images in queries)
    figure = _figure(1.8 * columns, 2.1 * len(queries))
    for row, (caption, images) in enumerate(queries):
        for column, (image, correct) in enumerate(images):
            axes = figure.add_subplot(len(queries), columns, row * columns + column + 1)
            axes.imshow(image)
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_edgecolor("green" if correct else "red")
                spine.set_linewidth(3)
            if column == 0:
                axes.set_title(caption[:60], loc="left", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_caption_grid(
    examples: Sequence[tuple[Image.Image, str, Sequence[str]]],
    path: str | os.PathLike[str],
    *,
    columns: int = 4,
) -> Path:
    """A grid of images (PIL), each with the caption the model generated above it (bold,
    ``generated:``) and the dataset's first reference caption below it (grey,
    ``reference:``), to read what a captioning model writes."""
    if not examples:
        raise ValueError("no captioned images to draw")
    columns = min(columns, len(examples))
    rows = math.ceil(len(examples) / columns)
    figure = _figure(2.6 * columns, 3.2 * rows + 0.4)
    figure.suptitle(
        "generated caption (bold, above) and the dataset's reference caption (grey, below)",
        fontsize=9,
    )
    for position, (image, generated, references) in enumerate(examples):
        axes = figure.add_subplot(rows, columns, position + 1)
        axes.imshow(image)
        axes.set_xticks([])
        axes.set_yticks([])
        label = f"generated: {generated or '(empty)'}"
        axes.set_title(textwrap.fill(label, 30), fontsize=8, fontweight="bold")
        reference = f"reference: {references[0]}" if references else "reference: (none)"
        axes.set_xlabel(textwrap.fill(reference, 30), fontsize=7, color="dimgray")
    figure.tight_layout()
    return _save(figure, path)


def plot_loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Plot a training loss against the step to a PNG; ``log_y`` for losses spanning decades."""
    if len(steps) != len(losses):
        raise ValueError(f"steps ({len(steps)}) and losses ({len(losses)}) differ in length")
    if len(steps) == 0:
        raise ValueError("no loss values to plot")
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    axes.plot(list(steps), [float(loss) for loss in losses], linewidth=1.2)
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.set_title(title or "training loss")
    figure.tight_layout()
    return _save(figure, path)
