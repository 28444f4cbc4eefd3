"""Shard validation: clean shards pass; each kind of damage is found, named and counted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.prepare import encode_image
from data_pipelines.synthetic import generate_samples
from data_pipelines.validate import format_report, validate_shards
from data_pipelines.write import write_shards

JPEG = encode_image(Image.new("RGB", (8, 8), (40, 90, 200)))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members (name, bytes), in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, image: bytes = JPEG, caption: bytes | None = b"a blue square"):
    members = [(f"{key}.jpg", image)]
    if caption is not None:
        members.append((f"{key}.txt", caption))
    return members


def _kinds(report) -> list[tuple[str, str | None]]:
    return [(p.kind, p.key) for shard in report.shards for p in shard.problems]


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    write_shards(generate_samples(10, seed=0, image_size=16), tmp_path / "d", samples_per_shard=4)
    return tmp_path / "d"


def test_clean_shards_pass(clean: Path) -> None:
    report = validate_shards(clean)
    assert report.ok and report.samples == 10
    assert [(s.samples, s.listed) for s in report.shards] == [(4, 4), (4, 4), (2, 2)]
    assert format_report(report).endswith("3 shards, 10 samples, no problems")
    assert json.loads(json.dumps(report.to_json()))["problems"] == {}


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (_sample("a", image=JPEG[: len(JPEG) // 2]), [("undecodable_image", "a")]),
        (_sample("a", image=b"\xff\xd8garbage" * 10), [("undecodable_image", "a")]),
        (_sample("a", image=b""), [("undecodable_image", "a")]),
        (_sample("a", caption=None), [("missing_caption", "a")]),
        (_sample("a", caption=b" \n"), [("empty_caption", "a")]),
        (_sample("a", caption=b"caf\xe9"), [("caption_not_utf8", "a")]),
        ([("a.txt", b"no image")], [("missing_image", "a")]),
        (_sample("a") + _sample("b") + _sample("a"), [("duplicate_key", "a")]),
    ],
    ids=[
        "truncated-jpeg",
        "corrupt-jpeg",
        "zero-byte-image",
        "missing-caption",
        "empty-caption",
        "non-utf8-caption",
        "missing-image",
        "duplicate-key",
    ],
)
def test_bad_samples_are_reported(
    tmp_path: Path, members: list[tuple[str, bytes]], expected: list[tuple[str, str]]
) -> None:
    report = validate_shards(str(_tar(tmp_path / "00000.tar", members)))
    assert not report.ok
    assert _kinds(report) == expected
    assert report.problem_counts() == {expected[0][0]: 1}


def test_duplicate_keys_across_shards(tmp_path: Path) -> None:
    _tar(tmp_path / "00000.tar", _sample("a") + _sample("b"))
    _tar(tmp_path / "00001.tar", _sample("b"))
    report = validate_shards(tmp_path)
    assert _kinds(report) == [("duplicate_key", "b")]
    assert report.shards[1].problems[0].detail == f"also {tmp_path / '00000.tar'}"


def _offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("where", ["inside-member", "member-boundary", "inside-header"])
def test_truncated_shards(clean: Path, where: str) -> None:
    shard = clean / "00001.tar"
    members = _offsets(shard)
    second_sample = next(m for m in members if m.name.startswith("000000005."))
    cut = {
        "inside-member": second_sample.offset_data + 10,
        "member-boundary": second_sample.offset,
        "inside-header": second_sample.offset + 100,
    }[where]
    shard.write_bytes(shard.read_bytes()[:cut])
    report = validate_shards(clean)
    assert _kinds(report) == [("truncated_shard", None)]
    assert report.shards[1].samples == 1 and report.shards[1].listed == 4


def test_missing_and_unopenable_shards(clean: Path) -> None:
    (clean / "00001.tar").unlink()
    (clean / "00002.tar").write_bytes(b"this is not a tar file" * 30)
    report = validate_shards(clean)
    assert _kinds(report) == [("unreadable_shard", None), ("unreadable_shard", None)]
    assert "does not open" in report.shards[1].problems[0].detail
    missing = validate_shards(f"{clean}/{{00000..00003}}.tar")
    assert [len(s.problems) for s in missing.shards] == [0, 1, 1, 1]


def test_count_that_disagrees_with_sizes_json(clean: Path) -> None:
    sizes = json.loads((clean / "sizes.json").read_text())
    (clean / "sizes.json").write_text(json.dumps({**sizes, "00002.tar": 3}))
    report = validate_shards(clean)
    assert _kinds(report) == [("size_mismatch", None)]
    text = format_report(report)
    assert "00002.tar: 2 samples (sizes.json: 3), 1 problems" in text
    assert text.endswith("problems: size_mismatch 1")


def test_json_report_lists_every_problem(tmp_path: Path) -> None:
    _tar(tmp_path / "00000.tar", _sample("a", caption=b"") + _sample("b", image=b""))
    data = validate_shards(tmp_path).to_json()
    assert data["ok"] is False and data["samples"] == 2
    assert data["problems"] == {"undecodable_image": 1, "empty_caption": 1}
    (shard,) = data["shard_reports"]
    assert [p["key"] for p in shard["problems"]] == ["a", "b"]


def test_nothing_matches_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no shards match"):
        validate_shards(tmp_path)


def test_unreadable_sizes_json_is_a_problem(clean: Path) -> None:
    (clean / "sizes.json").write_text("{not json")
    report = validate_shards(clean)
    assert not report.ok and report.problem_counts() == {"size_mismatch": 1}
    assert "sizes.json cannot be read" in report.problems[0].detail
    assert [s.samples for s in report.shards] == [4, 4, 2] and _kinds(report) == []
    assert format_report(report).startswith("size_mismatch: sizes.json cannot be read")


def _labelled_shards(root: Path, classes_per_shard: list[list[int]]) -> Path:
    root.mkdir()
    key = 0
    for index, classes in enumerate(classes_per_shard):
        members = []
        for cls in classes:
            members += _sample(f"{key:04d}") + [(f"{key:04d}.cls", str(cls).encode())]
            key += 1
        _tar(root / f"{index:05d}.tar", members)
    return root


def test_class_sorted_shards_give_a_warning_not_a_problem(tmp_path: Path) -> None:
    sorted_shards = _labelled_shards(tmp_path / "sorted", [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    report = validate_shards(sorted_shards)
    assert report.ok, "a warning is not a problem"
    assert len(report.warnings) == 1 and "3 of 3 shards hold a single class" in report.warnings[0]
    assert "warning: 3 of 3 shards" in format_report(report)
    assert report.to_json()["warnings"] == report.warnings
    mixed = _labelled_shards(tmp_path / "mixed", [[0, 1, 2], [2, 1, 0], [1, 1, 1]])
    assert validate_shards(mixed).warnings == []
