"""Tests for evals.plots: each figure is written as a real, non-empty PNG without a screen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals import plots
from evals.plots import (
    confusion_matrix,
    plot_classification,
    plot_confusion_matrix,
    plot_loss_curve,
    plot_per_class,
    plot_recall_at_k,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_confusion_matrix_counts() -> None:
    counts = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
def test_plot_confusion_matrix(tmp_path, from_logits, normalize) -> None:
    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(20) % 4
    source = logits if from_logits else logits.argmax(dim=1)
    path = plot_confusion_matrix(
        source,
        targets,
        ["cat", "dog", "car", "tree"],
        tmp_path / "out" / "cm.png",
        normalize=normalize,
    )
    assert path == tmp_path / "out" / "cm.png"
    assert_png(path)


def test_plot_confusion_matrix_many_classes(tmp_path) -> None:
    targets = torch.arange(80)
    path = plot_confusion_matrix(targets, targets, [f"c{i}" for i in range(80)], tmp_path / "a.png")
    assert_png(path)


def test_plot_confusion_matrix_rejects_bad_indices(tmp_path) -> None:
    with pytest.raises(ValueError, match="len\\(classnames\\)"):
        plot_confusion_matrix(
            torch.tensor([0, 3]), torch.tensor([0, 1]), ["a", "b"], tmp_path / "x"
        )
    with pytest.raises(ValueError, match="both be"):
        plot_confusion_matrix(torch.tensor([0]), torch.tensor([0, 1]), ["a", "b"], tmp_path / "x")


def test_plot_recall_at_k(tmp_path) -> None:
    metrics = {
        "image_retrieval_recall@1": 0.3,
        "text_retrieval_recall@1": 0.4,
        "image_retrieval_recall@5": 0.6,
        "text_retrieval_recall@5": 0.7,
        "image_retrieval_recall@10": 0.8,
        "text_retrieval_recall@10": 0.85,
        "image_retrieval_mean_rank": 3.2,
    }
    saved: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_save", lambda figure, path: saved.append(figure) or Path(path))
        plot_recall_at_k(metrics, tmp_path / "ticks.png")
    (axes,) = saved[0].axes
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1", "5", "10"]
    assert not axes.get_xticklabels(minor=True)
    assert_png(plot_recall_at_k(metrics, tmp_path / "recall.png"))
    with pytest.raises(ValueError, match="no 'image_retrieval_recall@k'"):
        plot_recall_at_k({"acc1": 0.5}, tmp_path / "none.png")


def test_plot_loss_curve(tmp_path) -> None:
    steps = list(range(50))
    losses = [4.0 * 0.95**s + 0.1 for s in steps]
    assert_png(plot_loss_curve(steps, losses, tmp_path / "loss.png"))
    assert_png(plot_loss_curve(steps, losses, tmp_path / "loss_log.png", log_y=True))
    with pytest.raises(ValueError, match="differ in length"):
        plot_loss_curve([0, 1], [1.0], tmp_path / "bad.png")


@pytest.mark.parametrize("case", ["few classes", "many classes", "multilabel"])
def test_plot_classification_picks_a_readable_figure(tmp_path, case) -> None:
    generator = torch.Generator().manual_seed(0)
    classes = 80 if case == "many classes" else 4
    logits = torch.randn(200, classes, generator=generator)
    if case == "multilabel":
        targets = (torch.rand(200, classes, generator=generator) < 0.3).long()
    else:
        targets = torch.randint(0, classes, (200,), generator=generator)
    names = [f"class {i}" for i in range(classes)]
    assert_png(plot_classification(logits, targets, names, tmp_path / "figure.png"))


def test_plot_per_class_checks_its_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="2 values for 3 class names"):
        plot_per_class([0.5, 0.7], ["a", "b", "c"], tmp_path / "x.png", ylabel="recall")


def test_plot_caption_grid_labels_generated_and_reference_captions(tmp_path) -> None:
    from PIL import Image

    examples = [(Image.new("RGB", (8, 8)), "a red circle", ["a small red circle"])] * 2
    saved: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_save", lambda figure, path: saved.append(figure) or Path(path))
        plots.plot_caption_grid(examples, tmp_path / "labels.png")
    figure = saved[0]
    assert "generated caption" in figure.get_suptitle() and "reference" in figure.get_suptitle()
    for axes in figure.axes:
        assert axes.get_title() == "generated: a red circle"
        assert axes.get_xlabel() == "reference: a small red circle"
    assert_png(plots.plot_caption_grid(examples, tmp_path / "grid.png"))
