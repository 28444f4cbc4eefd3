"""`vlp shards write | validate | inspect` through `main(argv)`: output, exit codes, errors."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from launch.cli import main


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """Two classes with spaces in their names, three 40x24 PNGs each, one broken file."""
    root = tmp_path / "src"
    for c, name in enumerate(("snow leopard", "red fox")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 24), (60 * i, 100 * c, 90)).save(root / name / f"{i}.png")
    (root / "red fox" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_counts_of_one_read_in_the_singular(
    class_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "one"
    assert main(["shards", "write", str(class_folder), str(out), "--max-side", "16"]) == 0
    text = capsys.readouterr().out
    assert f"wrote 6 samples in 1 shard to {out}\n" in text and "skipped 1 sample:" in text


def test_a_folder_of_corrupt_images_writes_nothing_and_the_fixed_rerun_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "src"
    (root / "cat").mkdir(parents=True)
    for i in range(2):
        (root / "cat" / f"{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "shards"
    assert main(["shards", "write", str(root), str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(
        f"vlp: error: write_shards: no sample was written to {out}: all 2 were skipped"
    )
    assert f"skipped 2 samples:\n  {root}/cat/0.jpg: undecodable image: " in captured.out
    assert "UnidentifiedImageError: cannot identify image file\n" in captured.out
    assert "BytesIO" not in captured.out + captured.err
    assert not out.exists()  # no classnames.txt or sizes.json that refuse the rerun

    Image.new("RGB", (40, 24)).save(root / "cat" / "0.jpg")
    assert main(["shards", "write", str(root), str(out)]) == 0
    assert "wrote 1 sample in 1 shard" in capsys.readouterr().out


def test_write_validate_inspect(
    class_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    argv = ["shards", "write", str(class_folder), str(out), "--samples-per-shard", "4"]
    assert main([*argv, "--max-side", "16", "--caption-template", "a photo of the {c}."]) == 0
    text = capsys.readouterr().out
    assert "wrote 6 samples in 2 shards" in text
    assert 'classes (cls 0..1): ["red fox", "snow leopard"]' in text
    assert f"skipped 1 sample:\n  {class_folder}/red fox/broken.jpg: undecodable image" in text
    with tarfile.open(out / "00000.tar") as tar:
        assert tar.extractfile("000000000.txt").read() == b"a photo of the red fox."  # type: ignore[union-attr]
        assert tar.extractfile("000000000.cls").read() == b"0"  # type: ignore[union-attr]

    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("vlp: error: write_shards: output folder")
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()

    assert main(["shards", "validate", str(out)]) == 0
    assert capsys.readouterr().out.endswith("2 shards, 6 samples, no problems\n")
    grid = tmp_path / "grid.png"
    assert main(["shards", "inspect", str(out), "-n", "3", "--grid", str(grid)]) == 0
    text = capsys.readouterr().out
    assert text.count("    caption: ") == 3 and "'a photo of a red fox.'" in text
    assert Image.open(grid).format == "PNG"


def test_validate_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "t.jsonl"
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    rows = [
        {"image": "a.png", "caption": "one", "summary": "s"},
        {"image": "a.png", "caption": "2"},
    ]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    assert main(["shards", "write", str(table), str(out), "--workers", "2"]) == 0
    capsys.readouterr()

    shard = out / "00000.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    shard.write_bytes(shard.read_bytes()[:end])  # cut after the last member: no end-of-archive
    assert main(["shards", "validate", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"] == {"truncated_shard": 1}
    for nowhere in ("00009.tar", "nope"):  # a usage error (2), not a report of problems (1)
        assert main(["shards", "validate", str(tmp_path / nowhere)]) == 2
        assert f"no shards match '{tmp_path / nowhere}': no such folder or file" in (
            capsys.readouterr().err
        )
    (tmp_path / "empty").mkdir()
    assert main(["shards", "validate", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("vlp: error: no shards match")
    with pytest.raises(SystemExit, match="2"):
        main(["shards", "validate"])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("data.txt", "not a folder and not a .csv, .tsv, .parquet, .jsonl file"),
        ("missing.csv", "missing.csv: no such file"),
    ],
)
def test_write_usage_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, message: str
) -> None:
    assert main(["shards", "write", str(tmp_path / source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_write_from_a_class_folder_names_the_classes_beside_the_shards(
    class_folder: Path, tmp_path: Path
) -> None:
    """`vlp eval` finds the class names of `cls` in classnames.txt, as CLIP_benchmark's layout."""
    assert main(["shards", "write", str(class_folder), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "classnames.txt").read_text() == "red fox\nsnow leopard\n"


def _classes_in_order(shards: Path) -> list[int]:
    with tarfile.open(shards / "00000.tar") as tar:
        names = [m.name for m in tar.getmembers() if m.name.endswith(".cls")]  # file order
        return [int(tar.extractfile(name).read()) for name in names]  # type: ignore[union-attr]


def test_write_shuffles_by_default_and_no_shuffle_keeps_the_class_order(
    class_folder: Path, tmp_path: Path
) -> None:
    """A class folder written in order gives one class per shard; the default shuffle mixes."""
    orders = {}
    for flags in ([], ["--seed", "1"], ["--seed", "1"], ["--no-shuffle"]):
        out = tmp_path / f"out{len(orders)}"
        assert main(["shards", "write", str(class_folder), str(out), *flags]) == 0
        orders[len(orders)] = _classes_in_order(out)
    assert orders[3] == sorted(orders[3])  # --no-shuffle: class 0 first, then class 1
    assert orders[1] == orders[2] != orders[3]  # seeded
    assert sorted(orders[0]) == sorted(orders[3])


def test_write_clip_benchmark_layout(class_folder: Path, tmp_path: Path, capsys) -> None:
    from evals.datasets import open_eval_set

    out = tmp_path / "cb"
    argv = ["shards", "write", str(class_folder), str(out), "--layout", "clip_benchmark",
            "--split", "val", "--samples-per-shard", "4", "--caption-template", "a {c}."]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 6 samples in 2 shards" in capsys.readouterr().out
    assert (out / "val" / "nshards.txt").read_text() == "2\n"
    assert sorted(p.name for p in (out / "val").iterdir()) == ["0.tar", "1.tar", "nshards.txt"]
    assert (out / "zeroshot_classification_templates.txt").read_text() == "a {c}.\n"
    eval_set = open_eval_set(out, split="val")
    assert eval_set.classnames == ["red fox", "snow leopard"] and eval_set.name == "wds/cb"


def test_write_guesses_table_columns_as_eval_does(tmp_path: Path, capsys) -> None:
    """`filepath`/`text` are accepted names (shared with `vlp eval`); two image columns are not."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("filepath,text\na.png,a black square\n")
    assert main(["shards", "write", str(tmp_path / "t.csv"), str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.extractfile("000000000.txt").read() == b"a black square"  # type: ignore[union-attr]

    (tmp_path / "u.csv").write_text("image,filepath,text\na.png,a.png,a black square\n")
    assert main(["shards", "write", str(tmp_path / "u.csv"), str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err
    assert "several image columns ('image', 'filepath'); choose one with --image-column" in error
    argv = ["shards", "write", str(tmp_path / "u.csv"), str(tmp_path / "out2"),
            "--image-column", "filepath"]  # fmt: skip
    assert main(argv) == 0
