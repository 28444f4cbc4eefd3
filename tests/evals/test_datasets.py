"""Tests for evals.datasets / wds_layout / file_sets / batches: every layout, and bad data."""

from __future__ import annotations

import csv
import io
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from torchvision import transforms

from data_pipelines.clip_benchmark_layout import write_clip_benchmark_layout
from evals.batches import describe_skips, encode_eval_set, iter_batches
from evals.datasets import open_eval_set
from evals.eval_set import EvalDataError
from tests.evals.conftest import FakeClip, write_image_folder

PREPROCESS = transforms.Compose([transforms.Resize((4, 4)), transforms.ToTensor()])


def labels_of(eval_set) -> list:
    return [sample.target for sample in eval_set.read()]


@pytest.fixture
def folder(tmp_path):
    write_image_folder(tmp_path / "shapes", per_class=2, classes=3)
    return tmp_path / "shapes"


def test_the_three_layouts_give_the_same_samples(folder, tmp_path) -> None:
    write_clip_benchmark_layout(
        folder, tmp_path / "wds", samples_per_shard=4, templates=["{c}!"], image_format="png"
    )
    rows = [[str(p), p.parent.name] for p in sorted(folder.glob("*/*.png"))]
    with (tmp_path / "set.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label"], *rows])
    sets = [open_eval_set(p) for p in (tmp_path / "wds", folder, tmp_path / "set.csv")]
    assert [s.name for s in sets] == ["wds/wds", "shapes", "set"]
    assert all(s.kind == "classification" for s in sets)
    assert all(s.classnames == ["circle shape", "square shape", "triangle shape"] for s in sets)
    assert sets[0].templates == ["{c}!"] and sets[1].templates is None
    assert labels_of(sets[0]) == labels_of(sets[1]) == labels_of(sets[2]) == [0, 0, 1, 1, 2, 2]
    decoded = [torch.cat([b.images for b in iter_batches(s, PREPROCESS)]) for s in sets]
    torch.testing.assert_close(decoded[0], decoded[1])  # png kept byte for byte in the shards
    torch.testing.assert_close(decoded[1], decoded[2])


def test_multilabel_and_retrieval_shards(tmp_path) -> None:
    image = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(image, format="webp")
    for kind in ("multilabel", "retrieval"):
        root = tmp_path / kind
        (root / "test").mkdir(parents=True)
        (root / "dataset_type.txt").write_text(f"{kind}\n")
        (root / "classnames.txt").write_text("a\nb\nc\n")
        (root / "test" / "nshards.txt").write_text("1\n")
        with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
            for i in range(2):
                npy = io.BytesIO()
                np.save(npy, np.array([1, 0, i]))
                sink.write({"__key__": f"s{i}", "webp": image.getvalue(), "npy": npy.getvalue(),
                            "txt": f"one {i}\ntwo {i}"})  # fmt: skip
    multilabel = open_eval_set(tmp_path / "multilabel")
    assert multilabel.kind == "multilabel" and labels_of(multilabel) == [[1, 0, 0], [1, 0, 1]]
    retrieval = open_eval_set(tmp_path / "retrieval")
    assert retrieval.kind == "retrieval" and retrieval.classnames is None
    assert [s.captions for s in retrieval.read()] == [("one 0", "two 0"), ("one 1", "two 1")]
    encoded = encode_eval_set(FakeClip(dim=4), multilabel, PREPROCESS, batch_size=1)
    assert encoded.targets().tolist() == [[1, 0, 0], [1, 0, 1]]


def test_undecodable_images_are_counted_and_left_out(folder, caplog) -> None:
    (folder / "square shape" / "broken.png").write_bytes(b"\x89PNG broken")
    eval_set = open_eval_set(folder)
    with caplog.at_level(logging.WARNING):
        encoded = encode_eval_set(FakeClip(dim=4), eval_set, PREPROCESS, batch_size=2)
    assert encoded.features.shape == (6, 4)
    assert encoded.targets().tolist() == [0, 0, 1, 1, 2, 2]
    record = describe_skips(encoded.skipped)
    assert record["images_skipped"] == 1 and "broken.png" in record["skipped_examples"][0]
    assert "broken.png" in caplog.text


def test_workers_evaluate_the_same_samples(folder) -> None:
    eval_set = open_eval_set(folder)
    alone = encode_eval_set(FakeClip(dim=4), eval_set, PREPROCESS, batch_size=2)
    shared = encode_eval_set(FakeClip(dim=4), eval_set, PREPROCESS, batch_size=2, workers=2)
    order = sorted(range(6), key=lambda i: shared.samples[i].key)
    assert [shared.samples[i].key for i in order] == [s.key for s in alone.samples]
    torch.testing.assert_close(shared.features[order], alone.features)


@pytest.mark.parametrize("workers", [0, 2])
def test_labels_beyond_the_class_names_are_an_error(folder, tmp_path, workers) -> None:
    write_clip_benchmark_layout(folder, tmp_path / "wds")
    (tmp_path / "wds" / "classnames.txt").write_text("only\ntwo\n")
    eval_set = open_eval_set(tmp_path / "wds")
    with pytest.raises(EvalDataError, match="label 2 but the dataset has 2 class names"):
        encode_eval_set(FakeClip(dim=4), eval_set, PREPROCESS, workers=workers)


def test_given_class_names_must_match_the_class_count(folder) -> None:
    with pytest.raises(EvalDataError, match="2 class names were given but .* has 3 classes"):
        open_eval_set(folder, classnames=["only", "two"])
    assert open_eval_set(folder, classnames=["a", "b", "c"]).classnames == ["a", "b", "c"]


def test_empty_and_undecodable_datasets(tmp_path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(EvalDataError, match="no images in its 1 class subfolders"):
        encode_eval_set(FakeClip(dim=4), open_eval_set(tmp_path / "empty"), PREPROCESS)
    (tmp_path / "empty" / "cat" / "x.jpg").write_bytes(b"")
    with pytest.raises(EvalDataError, match="1 did not decode"):
        encode_eval_set(FakeClip(dim=4), open_eval_set(tmp_path / "empty"), PREPROCESS)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing.csv", "is not a dataset"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "is not a dataset"),
        (lambda p: (p / "train").mkdir() or (p / "train" / "nshards.txt").write_text("1") and p,
         "without a 'test' split"),
        (lambda p: (p / "t.csv").write_text("path,colour\na.png,red\n") and p / "t.csv",
         "needs an image column"),
        (lambda p: (p / "i.csv").write_text("path,label\na.png,3\n") and p / "i.csv",
         "give the class names"),
    ],
)  # fmt: skip
def test_not_a_dataset_is_named(tmp_path, make, match) -> None:
    with pytest.raises(EvalDataError, match=match):
        open_eval_set(make(tmp_path))
