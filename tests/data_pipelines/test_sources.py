"""Sources for `vlp shards write`: class folders and csv/tsv/parquet/jsonl tables -> sample dicts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipelines.prepare import Skipped
from data_pipelines.sources import SourceError, class_names, read_source


def _image(path: Path, size: tuple[int, int] = (8, 8)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return str(path)


def test_class_folder_with_spaces_templates_and_cls(tmp_path: Path) -> None:
    for name in ("red fox", "blue jay"):
        for i in range(2):
            _image(tmp_path / name / f"{i}.png")
    _image(tmp_path / "blue jay" / "nested" / "2.jpg")
    (tmp_path / "red fox" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()

    assert class_names(str(tmp_path)) == ["blue jay", "red fox"]
    samples = list(
        read_source(str(tmp_path), templates=["a photo of a {c}.", "{c}"], shuffle=False)
    )
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [s["cls"] for s in samples] == [0, 0, 0, 1, 1]
    assert [s["txt"] for s in samples] == [
        "a photo of a blue jay.",
        "blue jay",
        "a photo of a blue jay.",
        "red fox",
        "a photo of a red fox.",
    ]
    assert samples[2]["json"] == {"class": "blue jay", "path": "blue jay/nested/2.jpg"}
    assert samples[0]["image"] == str(tmp_path / "blue jay" / "0.png")


def test_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no class subfolders"):
        read_source(str(tmp_path))
    _image(tmp_path / "stray.png")
    (tmp_path / "cat").mkdir()
    with pytest.raises(SourceError, match="stray.png: images must be inside class subfolders"):
        read_source(str(tmp_path))
    (tmp_path / "stray.png").unlink()
    with pytest.raises(SourceError, match="does not contain"):
        read_source(str(tmp_path), templates=["a photo"])
    with pytest.raises(SourceError, match="not valid"):
        read_source(str(tmp_path), templates=["a {x} of {c}"])


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_and_tsv_rows_with_extra_columns(tmp_path: Path, suffix: str) -> None:
    _image(tmp_path / "imgs" / "a.png")
    absolute = _image(tmp_path / "elsewhere" / "b.png")
    table = tmp_path / f"meta{suffix}"
    with table.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writerow(["image", "caption", "summary"])
        writer.writerow(["imgs/a.png", "a red square, small", "red square"])
        writer.writerow([absolute, "another one", ""])
    samples = list(read_source(str(table)))
    assert samples[0] == {
        "key": "000000000",
        "image": f"{tmp_path}/imgs/a.png",
        "txt": "a red square, small",
        "json": {"url": "imgs/a.png"},
        "summary.txt": "red square",
    }
    assert samples[1]["image"] == absolute and "summary.txt" not in samples[1]


def test_parquet_with_structured_columns(tmp_path: Path) -> None:
    path = _image(tmp_path / "a.png")
    table = pa.table(
        {
            "img": [path, path],
            "text": ["first", None],
            "objects": [[{"tag": "fox", "box": [0.1, 0.2, 0.3, 0.4]}], []],
            "report": ["A fox.", "Nothing."],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    skipped: list[Skipped] = []
    samples = list(
        read_source(
            str(tmp_path / "t.parquet"),
            image_column="img",
            caption_column="text",
            on_skip=skipped.append,
        )
    )
    assert len(samples) == 1
    assert samples[0]["objects.json"] == [{"tag": "fox", "box": [0.1, 0.2, 0.3, 0.4]}]
    assert samples[0]["report.txt"] == "A fox."
    assert skipped == [
        Skipped(f"{tmp_path}/t.parquet row 1", "missing caption in column 'text'", "caption")
    ]


def test_jsonl_extra_fields_and_skipped_rows(tmp_path: Path) -> None:
    path = _image(tmp_path / "a.png")
    rows = [
        {"image": path, "caption": "a fox", "summary": "fox", "objects": [{"tag": "fox"}]},
        {"image": path, "caption": "   "},
        {"image": "", "caption": "no image"},
        {"image": path, "caption": 7},
    ]
    source = tmp_path / "t.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    skipped: list[Skipped] = []
    samples = list(read_source(str(source), on_skip=skipped.append))
    assert [s["key"] for s in samples] == ["000000000"]
    assert samples[0]["summary.txt"] == "fox" and samples[0]["objects.json"] == [{"tag": "fox"}]
    assert [(s.where.rsplit(" ", 2)[-2:], s.stage) for s in skipped] == [
        (["line", "2"], "caption"),
        (["line", "3"], "read"),
        (["line", "4"], "caption"),
    ]
    with pytest.raises(SourceError, match="line 2: empty caption"):
        list(read_source(str(source)))


def test_table_errors_name_file_line_and_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("picture,caption\nx.png,hi\n")
    with pytest.raises(
        SourceError, match=r"t.csv: no image column .*columns: 'picture', 'caption'.*--image-column"
    ):
        read_source(str(csv_path))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"image": "x.png", "caption": "ok"}\n{"image": "x.png"}\n')
    with pytest.raises(SourceError, match="t.jsonl line 2: no column 'caption'"):
        list(read_source(str(jsonl)))
    jsonl.write_text('{"image": "x.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(SourceError, match="t.jsonl line 2: not valid JSON"):
        list(read_source(str(jsonl)))
    with pytest.raises(SourceError, match="not a folder and not a"):
        read_source(str(tmp_path / "t.txt"))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_source(str(tmp_path / "missing.parquet"))


def test_parquet_image_column_must_hold_paths(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": [b"\xff\xd8"], "caption": ["bytes"]}), tmp_path / "t.parquet")
    skipped: list[Skipped] = []
    assert list(read_source(str(tmp_path / "t.parquet"), on_skip=skipped.append)) == []
    assert skipped[0].stage == "read" and "holds no image path or URL" in skipped[0].reason


def test_only_empty_class_folders_stop_before_anything_is_written(tmp_path: Path, capsys) -> None:
    from launch.cli import main

    for name in ("cat", "dog"):
        (tmp_path / "src" / name).mkdir(parents=True)
    with pytest.raises(SourceError, match="no images in its 2 class subfolders"):
        read_source(str(tmp_path / "src"))
    assert main(["shards", "write", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no images in its 2 class subfolders" in error[0], error
    assert not (tmp_path / "out" / "sizes.json").exists()


def test_sources_are_shuffled_by_default_seeded_and_keys_keep_source_order(
    tmp_path: Path,
) -> None:
    """Class-sorted folders would otherwise give one class per shard."""
    for name in "abcd":
        for i in range(5):
            _image(tmp_path / name / f"{i}.png")
    in_order = list(read_source(str(tmp_path), shuffle=False))
    shuffled = list(read_source(str(tmp_path)))
    assert shuffled == list(read_source(str(tmp_path), seed=0))
    assert shuffled != in_order and shuffled != list(read_source(str(tmp_path), seed=1))
    by_key = {s["key"]: s for s in in_order}
    assert sorted(shuffled, key=lambda s: s["key"]) == in_order
    assert all(by_key[s["key"]] == s for s in shuffled)
    assert len({s["cls"] for s in shuffled[:5]}) > 1, "the first shard's worth mixes classes"
