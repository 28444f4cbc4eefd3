"""Shard writing: img2dataset layout, sidecars, atomic names, refusal to mix datasets, extra
members, image shrinking, worker processes, skipped images and fsspec output URLs."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import pytest
from PIL import Image

from data_pipelines.decode import SampleError
from data_pipelines.prepare import Skipped
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import NothingWritten, write_shards


def _members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]


def test_layout_names_sidecars_and_members(tmp_path: Path) -> None:
    paths = write_shards(generate_samples(25, seed=0), tmp_path, samples_per_shard=10)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
        + [f"0000{i}_stats.json" for i in range(3)]
    )
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 5}
    stats = json.loads((tmp_path / "00002_stats.json").read_text())
    assert stats["successes"] == 5 and stats["count"] == 5 and stats["failed_to_download"] == 0

    members = _members(paths[0])
    assert len(members) == 40
    expected = next(iter(generate_samples(1, seed=0)))
    key = expected["key"]
    assert set(m for m in members if m.startswith(key)) == {
        f"{key}.jpg",
        f"{key}.txt",
        f"{key}.json",
        f"{key}.cls",
    }
    assert members[f"{key}.txt"].decode() == expected["txt"]
    assert int(members[f"{key}.cls"]) == expected["cls"]
    meta = json.loads(members[f"{key}.json"])
    assert meta["key"] == key and meta["summary"] == expected["json"]["summary"]
    image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
    assert image.format == "JPEG" and image.size == (32, 32)


@pytest.mark.parametrize(("fmt", "pil_name"), [("png", "PNG"), ("webp", "WEBP")])
def test_other_image_formats(tmp_path: Path, fmt: str, pil_name: str) -> None:
    (path,) = write_shards(generate_samples(3, seed=0), tmp_path, image_format=fmt)
    members = _members(path)
    data = members[f"{0:09d}.{fmt}"]
    assert Image.open(io.BytesIO(data)).format == pil_name


def test_samples_without_cls_have_no_cls_member(tmp_path: Path) -> None:
    samples = [{"key": "000000000", "image": Image.new("RGB", (8, 8)), "txt": "a dot"}]
    (path,) = write_shards(samples, tmp_path)
    assert sorted(_members(path)) == ["000000000.jpg", "000000000.json", "000000000.txt"]


def test_deterministic_bytes_and_no_temporary_files(tmp_path: Path) -> None:
    a = write_shards(generate_samples(5, seed=0), tmp_path / "a")
    b = write_shards(generate_samples(5, seed=0), tmp_path / "b")
    assert Path(a[0]).read_bytes() == Path(b[0]).read_bytes()
    assert not [n for n in os.listdir(tmp_path / "a") if n.endswith(".tmp")]


def test_no_pax_header_per_member(tmp_path: Path) -> None:
    """A float mtime made tarfile write a pax header before every member (two header blocks
    each, and a pax parse per member in every reader); an int one writes plain ustar headers."""
    (path,) = write_shards(generate_samples(3, seed=0), tmp_path)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert len(members) == 12
    assert all(m.pax_headers == {} and m.mtime == 0 for m in members)
    headers = len(members) + 2  # one header block per member, two end-of-archive blocks
    data_blocks = sum(-(-m.size // 512) for m in members)
    assert Path(path).stat().st_size <= (headers + data_blocks) * 512 + tarfile.RECORDSIZE


def test_refuses_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    write_shards(generate_samples(30, seed=0), tmp_path, samples_per_shard=10)
    with pytest.raises(FileExistsError, match="not empty"):
        write_shards(generate_samples(5, seed=0), tmp_path)
    paths = write_shards(generate_samples(5, seed=0), tmp_path, overwrite=True)
    assert [os.path.basename(p) for p in paths] == ["00000.tar"]
    assert not (tmp_path / "00001.tar").exists()
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 5}


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_format"):
        write_shards(generate_samples(1, seed=0), tmp_path / "x", image_format="bmp")
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(generate_samples(1, seed=0), tmp_path / "y", samples_per_shard=0)
    with pytest.raises(ValueError, match="key"):
        write_shards([{"key": "a.b", "image": b"", "txt": ""}], tmp_path / "z")


def test_extra_members_are_written(tmp_path: Path) -> None:
    sample: dict[str, Any] = {
        "key": "000000000",
        "image": Image.new("RGB", (8, 8)),
        "txt": "a dot",
        "summary.txt": "dot",
        "objects.json": [{"tag": "dot", "box": [0, 0, 1, 1]}],
        "seg.png": b"\x89PNG raw",
    }
    (path,) = write_shards([sample], tmp_path / "out")
    members = _members(path)
    assert members["000000000.summary.txt"] == b"dot"
    assert json.loads(members["000000000.objects.json"]) == sample["objects.json"]
    assert members["000000000.seg.png"] == b"\x89PNG raw"
    with pytest.raises(ValueError, match="cannot be a member suffix"):
        write_shards([{**sample, "png": b"x"}], tmp_path / "bad")


def test_max_side_shrinks_and_keeps_small_encoded_images(tmp_path: Path) -> None:
    big = io.BytesIO()
    Image.new("RGB", (64, 40), (10, 200, 10)).save(big, format="PNG")
    small = io.BytesIO()
    Image.new("RGB", (16, 10), (10, 200, 10)).save(small, format="JPEG")
    samples: list[dict[str, Any]] = [
        {"key": "000000000", "image": big.getvalue(), "txt": "big png"},
        {"key": "000000001", "image": small.getvalue(), "txt": "small jpg"},
        {"key": "000000002", "image": Image.new("RGB", (10, 64)), "txt": "tall PIL"},
    ]
    (path,) = write_shards(samples, tmp_path, max_side=32)
    members = _members(path)
    sizes = [Image.open(io.BytesIO(members[f"00000000{i}.jpg"])).size for i in range(3)]
    assert sizes == [(32, 20), (16, 10), (5, 32)]
    assert members["000000001.jpg"] == small.getvalue()  # right format and size: not re-encoded
    skipped: list[Skipped] = []
    junk = {**samples[0], "image": b"junk"}
    with pytest.raises(NothingWritten):
        write_shards([junk], tmp_path / "b", max_side=32, on_skip=skipped.append)
    assert [(s.where, s.stage) for s in skipped] == [("sample 000000000", "decode")]


def test_worker_count_does_not_change_the_bytes(tmp_path: Path) -> None:
    samples = list(generate_samples(70, seed=3, image_size=24))
    one = write_shards(samples, tmp_path / "one", samples_per_shard=30, max_side=16)
    two = write_shards(samples, tmp_path / "two", samples_per_shard=30, max_side=16, workers=2)
    assert [os.path.basename(p) for p in two] == ["00000.tar", "00001.tar", "00002.tar"]
    for a, b in zip(one, two, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert (tmp_path / "one/sizes.json").read_bytes() == (tmp_path / "two/sizes.json").read_bytes()


def test_unreadable_images_are_skipped_counted_or_raised(tmp_path: Path) -> None:
    good = Image.new("RGB", (8, 8))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    samples: list[dict[str, Any]] = [
        {"key": "000000000", "image": good, "txt": "ok"},
        {"key": "000000001", "image": str(tmp_path / "missing.jpg"), "txt": "gone"},
        {"key": "000000002", "image": str(tmp_path / "broken.jpg"), "txt": "broken"},
        {"key": "000000003", "image": good, "txt": "ok"},
    ]
    skipped: list[Skipped] = []
    (path,) = write_shards(samples, tmp_path / "out", on_skip=skipped.append)
    assert [(s.where, s.stage) for s in skipped] == [
        (str(tmp_path / "missing.jpg"), "read"),
        (str(tmp_path / "broken.jpg"), "decode"),
    ]
    assert sorted(m for m in _members(path) if m.endswith(".txt")) == [
        "000000000.txt",
        "000000003.txt",
    ]
    stats = json.loads((tmp_path / "out/00000_stats.json").read_text())
    assert stats == {"count": 4, "successes": 2, "failed_to_download": 1, "failed_to_resize": 1}
    with pytest.raises(SampleError, match="missing.jpg: cannot read image"):
        write_shards(samples, tmp_path / "strict")


def test_fsspec_output_url(tmp_path: Path) -> None:
    url = f"memory://{tmp_path.name}/shards"
    fs = fsspec.filesystem("memory")
    try:
        paths = write_shards(generate_samples(5, seed=0), url, samples_per_shard=3)
        assert paths == [f"{url}/00000.tar", f"{url}/00001.tar"]
        with fsspec.open(f"{url}/sizes.json", "rt") as f:
            assert json.load(f) == {"00000.tar": 3, "00001.tar": 2}
        with fsspec.open(paths[1], "rb") as f, tarfile.open(fileobj=f) as tar:
            assert len(tar.getnames()) == 8
        with pytest.raises(FileExistsError, match="not empty"):
            write_shards(generate_samples(1, seed=0), url)
    finally:
        fs.rm(f"/{tmp_path.name}", recursive=True)


def test_shuffled_folder_writes_the_same_bytes_for_any_worker_count(tmp_path: Path) -> None:
    from data_pipelines.sources import read_source

    folder = tmp_path / "folder"
    for cls, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        (folder / f"c{cls}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), colour).save(folder / f"c{cls}" / f"{i}.png")
    one = write_shards(read_source(str(folder), seed=3), tmp_path / "one", samples_per_shard=4)
    two = write_shards(
        read_source(str(folder), seed=3), tmp_path / "two", samples_per_shard=4, workers=2
    )
    assert [Path(p).read_bytes() for p in one] == [Path(p).read_bytes() for p in two]
    classes = [{m for m in _members(p) if m.endswith(".cls")} for p in one]
    first = {_members(one[0])[m] for m in classes[0]}
    assert len(first) > 1, "a shard of a shuffled class folder holds several classes"


def test_nothing_to_write_is_an_error_that_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    created = tmp_path / "new"
    with pytest.raises(NothingWritten, match=f"no sample was written to {created}: the input"):
        write_shards([], created, classnames=["cat"])
    assert not created.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    skipped: list[Skipped] = []
    bad = {"key": "0", "image": b"not an image", "txt": "a cat"}
    with pytest.raises(NothingWritten, match="all 1 were skipped"):
        write_shards([bad], existing, max_side=8, on_skip=skipped.append)
    assert existing.is_dir() and not list(existing.iterdir()) and len(skipped) == 1
