"""Tests for data_pipelines.clip_benchmark_layout: CLIP_benchmark's own reader reads our output."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

from data_pipelines.clip_benchmark_layout import write_clip_benchmark_layout
from data_pipelines.sources import SourceError
from tests.evals.conftest import write_image_folder


def clip_benchmark_read(root: Path, split: str = "test"):
    """(classes, templates, [(image size, label or captions)]) as CLIP_benchmark reads them."""
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset's shardshuffle warning
        dataset = builder.build_wds_dataset("x", lambda im: im.size, split, str(root))
        return dataset.classes, dataset.templates, list(dataset)


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_folder_to_layout_read_by_clip_benchmark(tmp_path) -> None:
    names = write_image_folder(tmp_path / "folder", per_class=3, classes=3)
    written = write_clip_benchmark_layout(
        tmp_path / "folder", tmp_path / "out", samples_per_shard=4, templates=["a {c}.", "{c}"]
    )
    assert (written.kind, written.samples, written.shards) == ("classification", 9, 3)
    split = tmp_path / "out" / "test"
    assert sorted(p.name for p in split.iterdir()) == ["0.tar", "1.tar", "2.tar", "nshards.txt"]
    assert (tmp_path / "out" / "dataset_type.txt").read_text() == "classification\n"
    classes, templates, samples = clip_benchmark_read(tmp_path / "out")
    assert classes == names == ["circle shape", "square shape", "triangle shape"]
    assert templates == ["a {c}.", "{c}"]
    assert [label for _, label in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(size == (32, 32) for size, _ in samples)


def test_csv_labels_by_name_and_by_index(tmp_path) -> None:
    write_image_folder(tmp_path / "folder", per_class=2, classes=2)
    images = sorted(tmp_path.glob("folder/*/*.png"))
    rows = [[str(p.relative_to(tmp_path)), p.parent.name] for p in images]
    table = write_table(tmp_path / "by_name.csv", ["path", "label"], rows)
    written = write_clip_benchmark_layout(table, tmp_path / "a")
    assert written.classnames == ["circle shape", "square shape"]
    assert [label for _, label in clip_benchmark_read(tmp_path / "a")[2]] == [0, 0, 1, 1]

    by_index = [
        [path, str(1 - ["circle shape", "square shape"].index(name))] for path, name in rows
    ]
    table = write_table(tmp_path / "by_index.csv", ["image", "class"], by_index)
    written = write_clip_benchmark_layout(table, tmp_path / "b", classnames=["square", "circle"])
    classes, _, samples = clip_benchmark_read(tmp_path / "b")
    assert classes == ["square", "circle"] and [label for _, label in samples] == [1, 1, 0, 0]
    with pytest.raises(SourceError, match="give the class names"):
        write_clip_benchmark_layout(table, tmp_path / "c")


def test_csv_captions_become_a_retrieval_set(tmp_path) -> None:
    write_image_folder(tmp_path / "folder", per_class=1, classes=2)
    first, second = sorted(tmp_path.glob("folder/*/*.png"))
    rows = [[str(first), "a circle"], [str(second), "a square"], [str(first), "round\nthing"]]
    table = write_table(tmp_path / "captions.csv", ["filepath", "caption"], rows)
    written = write_clip_benchmark_layout(table, tmp_path / "out")
    assert written.kind == "retrieval" and written.samples == 2
    assert not (tmp_path / "out" / "classnames.txt").exists()
    _, _, samples = clip_benchmark_read(tmp_path / "out")
    assert [captions for _, captions in samples] == [["a circle", "round\\nthing"], ["a square"]]


def test_undecodable_images_are_skipped_and_listed(tmp_path) -> None:
    write_image_folder(tmp_path / "folder", per_class=2, classes=2)
    (tmp_path / "folder" / "circle shape" / "broken.png").write_bytes(b"not a png")
    written = write_clip_benchmark_layout(tmp_path / "folder", tmp_path / "out")
    assert written.samples == 4
    assert [Path(s.where).name for s in written.skipped] == ["broken.png"]


def test_refuses_a_split_that_holds_files(tmp_path) -> None:
    write_image_folder(tmp_path / "folder", per_class=1, classes=2)
    write_clip_benchmark_layout(tmp_path / "folder", tmp_path / "out")
    with pytest.raises(FileExistsError):
        write_clip_benchmark_layout(tmp_path / "folder", tmp_path / "out")
    assert (
        write_clip_benchmark_layout(tmp_path / "folder", tmp_path / "out", overwrite=True).samples
        == 2
    )
    write_clip_benchmark_layout(tmp_path / "folder", tmp_path / "out", split="train")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["test", "train"]
