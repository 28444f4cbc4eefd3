"""Shard writing: img2dataset layout, sidecars, atomic names, refusal to mix datasets."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards


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
