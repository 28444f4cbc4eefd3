"""`vlp shards attach`: records merged into the json by key, every other byte copied, the input
untouched, each bad record, shard and folder refused with a message that names it."""

from __future__ import annotations

import json
import random
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data_pipelines.attach import AttachError, AttachReport, attach_fields
from data_pipelines.prepare import encode_image
from data_pipelines.synthetic import generate_samples
from data_pipelines.tario import RawSample, iter_samples
from data_pipelines.validate import format_report, validate_shards
from data_pipelines.write import write_shards
from launch.cli import main
from tests.data_pipelines.conftest import write_tar

KEYS = [f"{i:09d}" for i in range(10)]
JPEG = encode_image(Image.new("RGB", (8, 8), (200, 60, 40)))
BOX = [0.1, 0.2, 0.6, 0.9]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Ten procedural samples in shards of 4, 4 and 2 (their json holds summary and objects)."""
    out = tmp_path / "in"
    write_shards(generate_samples(10, seed=0, image_size=16), out, samples_per_shard=4)
    return out


def _record(key: str, **fields: Any) -> dict[str, Any]:
    """A valid record: a summary and two objects with 3-d features, plus ``fields``."""
    objects = [
        {"box": BOX, "tag": "dog", "attributes": ["brown"], "feature": [0.5, 1.0, 2.0]},
        {"box": [0.0, 0.0, 1.0, 1.0], "tag": "grass", "attributes": [], "feature": [0, 1, 2]},
    ]
    return {"key": key, "summary": f"summary of {key}", "objects": objects, **fields}


def _jsonl(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    """A JSONL file; a str line is written as it is (bad JSON included)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _samples(folder: Path) -> list[RawSample]:
    samples = []
    for shard in sorted(folder.glob("*.tar")):
        with open(shard, "rb") as f:
            samples += list(iter_samples(f, shard.name))
    return samples


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _member_names(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_fields_are_merged_and_everything_else_is_copied(shards: Path, tmp_path: Path) -> None:
    records = {key: _record(key, detector="vinvl") for key in KEYS[:8]}
    jsonl = _jsonl(tmp_path / "r.jsonl", [*records.values(), _record("not-a-sample")])
    before = _files(shards)

    report = attach_fields(shards, jsonl, tmp_path / "out")

    # the synthetic json has a summary and objects already: 2 keys replaced per sample
    expected = AttachReport(10, 8, 2, 1, 3, overridden=16, unused_examples=["not-a-sample"])
    assert report == expected
    out = tmp_path / "out"
    assert _files(shards) == before, "the input is never edited"
    assert sorted(_files(out)) == sorted(before), "same shard names, stats and sizes.json"
    sizes = {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    assert json.loads((out / "sizes.json").read_text()) == sizes
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert _member_names(out / name) == _member_names(shards / name)
    for old, new in zip(_samples(shards), _samples(out), strict=True):
        assert old.key == new.key and old.members.keys() == new.members.keys()
        assert {k: v for k, v in old.members.items() if k != "json"} == {
            k: v for k, v in new.members.items() if k != "json"
        }, "image, caption and cls are copied byte for byte"
        if old.key in records:
            fields = {k: v for k, v in records[old.key].items() if k != "key"}
            assert json.loads(new.members["json"]) == {**json.loads(old.members["json"]), **fields}
        else:
            assert new.members["json"] == old.members["json"]
    assert validate_shards(out).ok
    with tarfile.open(out / "00000.tar") as tar:
        assert all(m.pax_headers == {} for m in tar), "no pax header per member (a float mtime)"


@pytest.mark.parametrize("seed", range(5))
def test_counts_add_up_for_any_subset_of_records(shards: Path, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    keys = rng.sample(KEYS, rng.randrange(len(KEYS) + 1))
    strays = [f"stray{i}" for i in range(rng.randrange(4))]
    jsonl = _jsonl(tmp_path / "r.jsonl", [{"key": k, "n": i} for i, k in enumerate(keys + strays)])
    report = attach_fields(shards, jsonl, tmp_path / "out")
    assert (report.attached, report.without_record) == (len(keys), len(KEYS) - len(keys))
    assert report.unused_records == len(strays) and report.unused_examples == strays
    assert report.overridden == 0
    attached = {s.key: json.loads(s.members["json"]).get("n") for s in _samples(tmp_path / "out")}
    assert attached == {k: (keys.index(k) if k in keys else None) for k in KEYS}


def test_a_sample_without_json_gets_one(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar", [("a", {"jpg": JPEG, "txt": b"a red square"})])
    jsonl = _jsonl(tmp_path / "r.jsonl", [{"key": "a", "summary": "red"}])
    report = attach_fields(tmp_path / "in", jsonl, tmp_path / "out")
    assert (report.attached, report.overridden) == (1, 0)
    (sample,) = _samples(tmp_path / "out")
    assert json.loads(sample.members["json"]) == {"key": "a", "summary": "red"}
    assert (sample.members["jpg"], sample.members["txt"]) == (JPEG, b"a red square")
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 1}


def _objects(*objects: Any) -> dict[str, Any]:
    return {"key": KEYS[1], "objects": list(objects)}


def _object(**changes: Any) -> dict[str, Any]:
    return {"box": BOX, "tag": "dog", "attributes": ["brown"], **changes}


BAD_FIELDS = {
    "box-out-of-range": (
        _objects(_object(box=[0.1, 0.1, 1.2, 0.5])),
        r"objects\[0\]: box .* is not normalised to \[0, 1\]",
    ),
    "box-in-pixels": (
        _objects(_object(), _object(box=[10, 20, 300, 200])),
        r"objects\[1\]: box .* not normalised",
    ),
    "box-of-3": (_objects(_object(box=[0.1, 0.2, 0.3])), "box must be 4 finite numbers"),
    "box-not-numbers": (_objects(_object(box=["0", 0, 1, 1])), "box must be 4 finite numbers"),
    "box-x0-after-x1": (_objects(_object(box=[0.5, 0.1, 0.4, 0.6])), "needs x0 < x1 and y0 < y1"),
    "box-empty-height": (_objects(_object(box=[0.1, 0.5, 0.4, 0.5])), "needs x0 < x1 and y0 < y1"),
    "features-unequal": (
        _objects(_object(feature=[1.0, 2.0]), _object(), _object(feature=[1.0, 2.0, 3.0])),
        r"features of unequal length: 2 \(objects\[0\]\), 3 \(objects\[2\]\)",
    ),
    "feature-not-numbers": (_objects(_object(feature=["a"])), "feature must be a non-empty list"),
    "tag-missing": (_objects(_object(tag=None)), "tag must be text"),
    "attributes-not-text": (
        _objects(_object(attributes="brown")),
        "attributes must be a list of text",
    ),
    "object-not-a-dict": (_objects([0.1, 0.2, 0.3, 0.4]), "is not an object with box"),
    "objects-not-a-list": (
        {"key": KEYS[1], "objects": _object()},
        "objects must be a list, got dict",
    ),
    "summary-not-text": ({"key": KEYS[1], "summary": ["a", "b"]}, "summary must be text, got list"),
}


@pytest.mark.parametrize(("record", "message"), BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_fields_name_the_line_and_key(
    shards: Path, tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    jsonl = _jsonl(tmp_path / "r.jsonl", [_record(KEYS[0]), "", record])
    with pytest.raises(AttachError, match=rf"r\.jsonl line 3 \(key '{KEYS[1]}'\): .*{message}"):
        attach_fields(shards, jsonl, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "records are checked before anything is written"


def test_nan_in_a_box_is_refused(shards: Path, tmp_path: Path) -> None:
    nan_object = '{"box": [NaN, 0, 1, 1], "tag": "t", "attributes": []}'  # json.loads reads NaN
    line = f'{{"key": "{KEYS[0]}", "objects": [{nan_object}]}}'
    jsonl = _jsonl(tmp_path / "r.jsonl", [line])
    with pytest.raises(AttachError, match="line 1 .*box must be 4 finite numbers"):
        attach_fields(shards, jsonl, tmp_path / "out")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"key": "000000001", "summary": ', r"line 2: not valid JSON"),
        ("[" * 100_000, r"line 2: not valid JSON"),
        ('["000000001"]', r"line 2: a record must be a JSON object"),
        ('{"summary": "no key"}', r'line 2: no "key" \(the sample key, a non-empty string\)'),
        ('{"key": 7, "summary": "x"}', r'line 2: no "key" .*got 7'),
        (json.dumps(_record(KEYS[0])), r"line 2: duplicate key '000000000' \(also line 1\)"),
    ],
    ids=[
        "bad-json",
        "hostile-nesting",
        "not-an-object",
        "missing-key",
        "key-not-text",
        "duplicate-key",
    ],
)
def test_bad_records_name_the_line(shards: Path, tmp_path: Path, line: str, message: str) -> None:
    jsonl = _jsonl(tmp_path / "r.jsonl", [_record(KEYS[0]), line])
    with pytest.raises(AttachError, match=message):
        attach_fields(shards, jsonl, tmp_path / "out")


def test_require_all_names_samples_without_a_record_and_changes_nothing(
    shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    attach_fields(shards, _jsonl(tmp_path / "all.jsonl", [{"key": k} for k in KEYS]), out)
    before = _files(out)
    jsonl = _jsonl(tmp_path / "r.jsonl", [_record(k) for k in KEYS[:8]])
    with pytest.raises(
        AttachError, match=r"2 samples have no record .*\(e\.g\. 000000008, 000000009\)"
    ):
        attach_fields(shards, jsonl, out, overwrite=True, require_all=True)
    assert _files(out) == before, "a failed attach leaves the output as it was (no .tmp left)"
    jsonl = _jsonl(tmp_path / "r.jsonl", [_record(k) for k in KEYS])
    report = attach_fields(shards, jsonl, out, overwrite=True, require_all=True)
    assert report.attached == 10


def test_output_folder_rules(shards: Path, tmp_path: Path) -> None:
    jsonl = _jsonl(tmp_path / "r.jsonl", [_record(KEYS[0])])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("kept")
    attach_fields(shards, jsonl, out)  # other files are no shards
    with pytest.raises(FileExistsError, match="already holds shards .*--overwrite"):
        attach_fields(shards, jsonl, out)
    (out / "00007.tar").write_bytes(b"a shard of an older dataset")
    attach_fields(shards, jsonl, out, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (out / "notes.md").read_text() == "kept"
    (tmp_path / "link").symlink_to(shards)
    for same in (shards, tmp_path / "in" / ".." / "in", tmp_path / "link"):
        with pytest.raises(
            AttachError, match="holds the input shards .*never edits shards in place"
        ):
            attach_fields(shards, jsonl, same, overwrite=True)


@pytest.mark.parametrize("member", [b"[1]", b"{not json", b"[" * 100_000])
def test_unusable_json_member_or_shard_is_named(tmp_path: Path, member: bytes) -> None:
    (tmp_path / "in").mkdir()
    shard = write_tar(
        tmp_path / "in" / "00000.tar", [("a", {"jpg": JPEG, "txt": b"x", "json": member})]
    )
    assert validate_shards(tmp_path / "in").ok, "a json that is no object is not checked"
    jsonl = _jsonl(tmp_path / "r.jsonl", [{"key": "a", "summary": "s"}])
    with pytest.raises(AttachError, match="00000.tar: sample a's json member is not a JSON object"):
        attach_fields(tmp_path / "in", jsonl, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    Path(shard).write_bytes(b"not a tar" * 100)
    with pytest.raises(AttachError, match="cannot read shard .*00000.tar"):
        attach_fields(tmp_path / "in", jsonl, tmp_path / "out")


@pytest.mark.parametrize(("record", "message"), BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_validate_flags_what_attach_refuses(
    tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    """One checker: shards written another way with a bad summary or box fail validation."""
    samples = list(generate_samples(3, seed=0, image_size=16))
    fields = {k: v for k, v in record.items() if k != "key"}
    samples[1]["json"] = {**samples[1]["json"], **fields}
    write_shards(samples, tmp_path / "d")
    report = validate_shards(tmp_path / "d")
    kind = f"bad_{next(iter(fields))}"
    ((problem,),) = [shard.problems for shard in report.shards]
    assert (problem.kind, problem.key) == (kind, KEYS[1])
    assert report.problem_counts() == {kind: 1}
    assert f"  {kind} {KEYS[1]}: " in format_report(report)
    assert re.search(message, problem.detail)


def test_cli_attach(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = _jsonl(tmp_path / "r.jsonl", [*(_record(k) for k in KEYS[:9]), _record("extra")])
    out = tmp_path / "out"
    argv = ["shards", "attach", str(shards), "--jsonl", str(jsonl), "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out == (
        f"attached 9 records to 10 samples in 3 shards -> {out}: 1 samples without a record, "
        "1 unused records (e.g. extra), 18 json keys replaced\n"
    )
    assert main(["shards", "validate", str(out)]) == 0
    capsys.readouterr()

    assert main([*argv, "--overwrite", "--require-all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlp: error: attach: 1 samples have no record") and err.count("\n") == 1
    assert main(argv) == 2
    assert "already holds shards" in capsys.readouterr().err
    _jsonl(jsonl, [{"key": KEYS[0], "objects": [_object(box=[0, 0, 2, 1])]}])
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "r.jsonl line 1 (key '000000000'): objects[0]: box" in err and err.count("\n") == 1
    with pytest.raises(SystemExit, match="2"):
        main(["shards", "attach", str(shards), "--out", str(out)])  # --jsonl is required
