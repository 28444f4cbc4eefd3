"""`vlp eval zeroshot|retrieval|linear-probe` and `vlp export` through their argparse commands."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from data_pipelines.clip_benchmark_layout import write_clip_benchmark_layout
from evals.results import read_result, result_filename
from launch.evaluate import add_eval_commands, add_export_command
from launch.run import StartupError
from tests.evals.conftest import save_run_checkpoint, write_image_folder


def parse(argv: list[str]) -> argparse.Namespace:
    """What `vlp` does once launch/cli.py registers the commands."""
    parser = argparse.ArgumentParser(prog="vlp")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_commands(commands)
    add_export_command(commands)
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    args = parse(argv)
    assert args.user_errors() == (StartupError,)
    return int(args.func(args))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from vlp.models import create_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    save_run_checkpoint(root, 3, create_model("vlp-tiny-vit")[0], "vlp-tiny-vit")
    return root


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    write_image_folder(base / "shapes", per_class=3, classes=5)
    write_clip_benchmark_layout(base / "shapes", base / "shapes_wds", samples_per_shard=8)
    return base / "shapes_wds"


def common(run_dir, dataset, out) -> list[str]:
    return ["--model", str(run_dir), "--dataset", str(dataset), "--out", str(out),
            "--workers", "0", "--batch-size", "4"]  # fmt: skip


def test_zeroshot_writes_clip_benchmark_json_and_png(run_dir, wds_root, tmp_path, capsys) -> None:
    assert run(["eval", "zeroshot", *common(run_dir, wds_root, tmp_path)]) == 0
    checkpoint = str(run_dir / "checkpoints" / "step_00000003")
    name = result_filename(
        dataset="wds/shapes_wds",
        model="vlp-tiny-vit",
        pretrained=checkpoint,
        task="zeroshot_classification",
    )
    result = read_result(tmp_path / name)
    assert result["dataset"] == "wds/shapes_wds" and result["pretrained"] == checkpoint
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert not math.isnan(result["metrics"]["acc5"])  # 5 classes
    assert result["images_evaluated"] == 15 and result["images_skipped"] == 0
    assert (tmp_path / name).with_suffix(".png").is_file()
    assert "acc1" in capsys.readouterr().out


def test_zeroshot_on_a_folder_counts_undecodable_images(run_dir, tmp_path) -> None:
    write_image_folder(tmp_path / "folder", per_class=2, classes=3)
    (tmp_path / "folder" / "circle shape" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({c: [f"a {c}"] for c in ["x", "y", "z"]}))
    classnames = tmp_path / "names.txt"
    classnames.write_text("x\ny\nz\n")
    argv = ["eval", "zeroshot", *common(run_dir, tmp_path / "folder", tmp_path / "out"),
            "--classnames", str(classnames), "--templates", str(templates)]  # fmt: skip
    assert run(argv) == 0
    [path] = (tmp_path / "out").glob("*.json")
    result = read_result(path)
    assert result["images_evaluated"] == 6 and result["images_skipped"] == 1
    assert "bad.jpg" in result["skipped_examples"][0]
    assert math.isnan(result["metrics"]["acc5"])  # 3 classes


def test_retrieval_on_a_csv(run_dir, tmp_path) -> None:
    write_image_folder(tmp_path / "folder", per_class=2, classes=2)
    rows = [[str(p), f"a {p.parent.name}"] for p in sorted(tmp_path.glob("folder/*/*.png"))]
    rows.append([rows[0][0], "another caption"])
    with (tmp_path / "captions.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"], *rows])
    argv = ["eval", "retrieval", *common(run_dir, tmp_path / "captions.csv", tmp_path / "out"),
            "--recall-k", "1", "2"]  # fmt: skip
    assert run(argv) == 0
    [path] = (tmp_path / "out").glob("*_zeroshot_retrieval.json")
    result = read_result(path)
    assert result["images_evaluated"] == 4 and result["captions"] == 5
    assert (
        result["metrics"]["image_retrieval_recall@2"]
        >= result["metrics"]["image_retrieval_recall@1"]
    )
    assert path.with_suffix(".png").is_file()
    assert path.with_name(f"{path.stem}_top_images.png").is_file()


@pytest.mark.parametrize("layout", ["folders", "wds splits"])
def test_linear_probe_few_shot(run_dir, tmp_path, layout) -> None:
    write_image_folder(tmp_path / "train", per_class=4, classes=3, seed=0)
    write_image_folder(tmp_path / "test", per_class=2, classes=3, seed=1)
    if layout == "folders":
        argv = [*common(run_dir, tmp_path / "test", tmp_path / "out"),
                "--train-dataset", str(tmp_path / "train")]  # fmt: skip
    else:
        for split in ("train", "test"):
            write_clip_benchmark_layout(tmp_path / split, tmp_path / "test_wds", split=split)
        argv = common(run_dir, tmp_path / "test_wds", tmp_path / "out")
    assert run(["eval", "linear-probe", *argv, "--fewshot-k", "3"]) == 0
    [path] = (tmp_path / "out").glob("test*_linear_probe.json")
    result = read_result(path)
    assert {"lp_acc1", "lp_mean_per_class_recall", "weight_decay"} <= set(result["metrics"])
    assert result["metrics"]["fewshot_k"] == 3 and result["train_images"] == 9
    assert result["images_evaluated"] == 6


def test_export_then_evaluate_the_export(run_dir, wds_root, tmp_path) -> None:
    assert run(["export", str(run_dir), str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "open_clip_config.json").is_file()
    assert run(["eval", "zeroshot", *common(tmp_path / "export", wds_root, tmp_path / "a")]) == 0
    assert run(["eval", "zeroshot", *common(run_dir, wds_root, tmp_path / "b")]) == 0
    [exported] = (tmp_path / "a").glob("*.json")
    [original] = (tmp_path / "b").glob("*.json")
    assert read_result(exported)["metrics"] == read_result(original)["metrics"]
    with pytest.raises(StartupError, match="not empty"):
        run(["export", str(run_dir), str(tmp_path / "export")])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"--model": "nowhere/run"}, "is not a model"),
        ({"--dataset": "nowhere.csv"}, "is not a dataset"),
        ({"--classnames": "NAMES"}, "2 class names were given but .* has 5 classes"),
        ({"--templates": "TEMPLATES"}, "templates: .*placeholder"),
    ],
)
def test_user_errors_are_one_startup_error(run_dir, wds_root, tmp_path, change, match) -> None:
    (tmp_path / "NAMES").write_text("a\nb\n")
    (tmp_path / "TEMPLATES").write_text("a photo\n")
    argv = ["eval", "zeroshot", *common(run_dir, wds_root, tmp_path / "out")]
    for flag, value in change.items():
        value = str(tmp_path / value) if value in ("NAMES", "TEMPLATES") else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(StartupError, match=match):
        run(argv)


def test_linear_probe_never_trains_on_the_test_set(run_dir, tmp_path) -> None:
    write_image_folder(tmp_path / "folder", per_class=2, classes=2)
    with pytest.raises(StartupError, match="--train-dataset"):
        run(["eval", "linear-probe", *common(run_dir, tmp_path / "folder", tmp_path / "out")])


def test_an_empty_dataset_is_a_startup_error(run_dir, tmp_path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(StartupError, match="no images in its 1 class subfolders"):
        run(["eval", "zeroshot", *common(run_dir, tmp_path / "empty", tmp_path / "out")])


@pytest.mark.slow
def test_clip_benchmark_cli_agrees_with_vlp_eval_zeroshot(run_dir, tmp_path) -> None:
    """`clip_benchmark eval` on our export and our CLIP_benchmark-layout dataset gives our numbers.

    CB runs with ``--no_amp`` (its default autocast changes the embeddings on the CPU) and
    ``--output FILE`` (its default file name embeds the raw ``local-dir:PATH`` string), through
    ``python -m evals.clip_benchmark_cli`` (its CLI under the NumPy 2.4 fix).
    """
    pytest.importorskip("clip_benchmark")
    write_image_folder(tmp_path / "folder", per_class=4, classes=6)
    root = tmp_path / "shapes"
    write_clip_benchmark_layout(tmp_path / "folder", root, samples_per_shard=10, templates=[
        "a photo of a {c}.", "a drawing of a {c}."])  # fmt: skip
    export = tmp_path / "export"
    assert run(["export", str(run_dir), str(export)]) == 0

    assert run(["eval", "zeroshot", *common(export, root, tmp_path / "ours")]) == 0
    [ours_path] = (tmp_path / "ours").glob("*.json")
    ours = read_result(ours_path)

    theirs_path = tmp_path / "theirs.json"
    command = [
        sys.executable, "-m", "evals.clip_benchmark_cli", "eval",
        "--dataset", "wds/shapes", "--dataset_root", str(root),
        "--task", "zeroshot_classification",
        "--model_type", "open_clip", "--model", f"local-dir:{export}", "--pretrained", "none",
        "--no_amp", "--batch_size", "4", "--num_workers", "0", "--output", str(theirs_path),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=300)
    theirs = read_result(theirs_path)

    for key in ("dataset", "model", "pretrained", "task", "language"):
        assert ours[key] == theirs[key], key
    assert ours["metrics"] == theirs["metrics"]
    assert ours["images_evaluated"] == 24


def cli(argv: list[str]) -> int:
    """`vlp ...` as a user runs it: one-line errors on stderr, exit code 2."""
    from launch.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory):
    """`vlp shards write` of a 3-class folder (with classnames.txt), and the demo's held-out
    shards (cls, no class names)."""
    base = tmp_path_factory.mktemp("own")
    write_image_folder(base / "folder", per_class=2, classes=3)
    assert cli(["shards", "write", str(base / "folder"), str(base / "shards"),
                "--samples-per-shard", "4"]) == 0  # fmt: skip
    from data_pipelines.synthetic import generate_samples
    from data_pipelines.write import write_shards

    write_shards(generate_samples(6, seed=1), base / "heldout", samples_per_shard=4)
    return base


def test_own_shards_evaluate_by_zeroshot_and_retrieval(run_dir, own_shards, tmp_path) -> None:
    shards = own_shards / "shards"
    assert cli(["eval", "zeroshot", *common(run_dir, shards, tmp_path / "z")]) == 0
    [path] = (tmp_path / "z").glob("*.json")
    result = read_result(path)
    assert result["dataset"] == "shards" and result["images_evaluated"] == 6
    assert cli(["eval", "retrieval", *common(run_dir, shards, tmp_path / "r")]) == 0
    [path] = (tmp_path / "r").glob("*_zeroshot_retrieval.json")
    assert read_result(path)["captions"] == 6


def test_demo_heldout_shards_need_class_names(run_dir, own_shards, tmp_path, capsys) -> None:
    heldout = own_shards / "heldout"
    assert cli(["eval", "zeroshot", *common(run_dir, heldout, tmp_path / "a")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "class labels (cls) but there are no class names; give them with --classnames" in line
    from data_pipelines.synthetic import CLASSNAMES

    (tmp_path / "names.txt").write_text("\n".join(CLASSNAMES))
    argv = [*common(run_dir, heldout, tmp_path / "b"), "--classnames", str(tmp_path / "names.txt")]
    assert cli(["eval", "zeroshot", *argv]) == 0
    assert cli(["eval", "retrieval", *common(run_dir, heldout, tmp_path / "c")]) == 0


def test_shards_without_labels_are_not_classified(run_dir, tmp_path, capsys) -> None:
    write_image_folder(tmp_path / "folder", per_class=1, classes=2)
    rows = [[str(p), "a shape"] for p in sorted(tmp_path.glob("folder/*/*.png"))]
    with (tmp_path / "t.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"], *rows])
    assert cli(["shards", "write", str(tmp_path / "t.csv"), str(tmp_path / "shards")]) == 0
    assert cli(["eval", "zeroshot", *common(run_dir, tmp_path / "shards", tmp_path / "o")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "no 'cls' class label" in line and "vlp eval retrieval" in line


def test_several_datasets_in_one_call(run_dir, wds_root, own_shards, tmp_path, capsys) -> None:
    argv = [*common(run_dir, wds_root, tmp_path), "--dataset", str(own_shards / "shards")]
    assert cli(["eval", "zeroshot", *argv]) == 0
    assert {read_result(p)["dataset"] for p in tmp_path.glob("*.json")} == {
        "wds/shapes_wds",
        "shards",
    }
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "wds/shapes_wds", "shards"]
    # 5 classes, then 3: acc5 is NaN for the second only, and the table says why.
    assert "acc5 [1]" in out and "[1] acc5 is NaN where a dataset has fewer than 5" in out


def test_retrieval_reads_the_captions_of_a_labelled_csv(run_dir, tmp_path, capsys) -> None:
    write_image_folder(tmp_path / "folder", per_class=1, classes=2)
    paths = sorted(tmp_path.glob("folder/*/*.png"))
    with (tmp_path / "t.csv").open("w", newline="") as handle:
        rows = [[str(p), p.parent.name, f"a {p.parent.name}"] for p in paths]
        csv.writer(handle).writerows([["filepath", "label", "text"], *rows])
    assert cli(["eval", "retrieval", *common(run_dir, tmp_path / "t.csv", tmp_path / "r")]) == 0
    assert cli(["eval", "zeroshot", *common(run_dir, tmp_path / "t.csv", tmp_path / "z")]) == 0
    with (tmp_path / "u.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["photo", "title", "caption"], [str(paths[0]), "x", "y"]])
    argv = common(run_dir, tmp_path / "u.csv", tmp_path / "u")
    assert cli(["eval", "retrieval", *argv]) == 2
    assert "no image column (expected one of image, path" in capsys.readouterr().err
    argv += ["--image-column", "photo"]
    assert cli(["eval", "retrieval", *argv]) == 2
    error = capsys.readouterr().err
    assert "several caption columns ('caption', 'title'); choose one with --caption-column" in error
    assert cli(["eval", "retrieval", *argv, "--caption-column", "title"]) == 0


def test_workers_default_to_the_cores_available(monkeypatch) -> None:
    """4 decoding processes on a 2-core machine made torch's DataLoader warn."""
    from launch.evaluate import _options

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    args = parse(["eval", "zeroshot", "--model", "m", "--dataset", "d", "--out", "o"])
    assert _options(args).workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert _options(args).workers == 4
    assert _options(parse(["eval", "zeroshot", "--model", "m", "--dataset", "d", "--out", "o",
                           "--workers", "3"])).workers == 3  # fmt: skip
