"""`vlp train --check --world-size N` plans every shipped recipe at the sizes its header
documents (one process, and each `accelerate launch --num_processes N ... KEY=VALUE` it shows),
and refuses, in one line, what would stop a run on N processes at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"


def _documented_sizes(recipe: Path) -> list[tuple[int, list[str]]]:
    """(processes, overrides): 1 with none, and every ``--num_processes N`` command in the
    header with the KEY=VALUE words of its lines."""
    header = [line[1:].strip() for line in recipe.read_text().splitlines() if line.startswith("#")]
    sizes: list[tuple[int, list[str]]] = [(1, [])]
    for index, line in enumerate(header):
        if match := re.search(r"--num_processes (\d+)", line):
            command = [line]
            while command[-1].endswith("\\") and index + len(command) < len(header):
                command.append(header[index + len(command)])
            words = " ".join(command).split()
            sizes.append((int(match[1]), [w for w in words if re.fullmatch(r"[a-z_.]+=\S+", w)]))
    return sizes


RECIPES = [
    pytest.param(recipe, processes, overrides, id=f"{recipe.stem}-{processes}")
    for recipe in sorted(CONFIGS.glob("*.yaml"))
    for processes, overrides in _documented_sizes(recipe)
]


def test_the_protoclip_header_documents_eight_processes() -> None:
    assert (8, ["optim.lr=0.0005", "optim.warmup_steps=15625", "train.steps=156250"]) in (
        _documented_sizes(CONFIGS / "protoclip.yaml")
    )


@pytest.mark.parametrize(("recipe", "processes", "overrides"), RECIPES)
def test_every_recipe_plans_at_its_documented_sizes(recipe, processes, overrides, capsys) -> None:
    argv = ["train", "--config", str(recipe), "--check", "--world-size", str(processes)]
    assert main(argv + overrides) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"planned for {processes} processes" in printed


def test_protoclip_at_eight_processes_gives_the_official_episode(capsys) -> None:
    argv = ["train", "--config", str(CONFIGS / "protoclip.yaml"), "--check", "--world-size", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "global batch:   512" in printed and "episode:        390 steps" in printed


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        (
            "demo.yaml",
            ["train.group_size=2"],
            "train.group_size=2 must be a positive divisor of the world size 3",
        ),  # fmt: skip
        (
            "demo.yaml",
            ["data.streams=4"],
            "data.streams=4 is not a multiple of processes x train.accum_steps = 3 x 1 = 3",
        ),  # fmt: skip
        (
            "protoclip_demo.yaml",
            ["objective.protoclip.episode_size=64"],
            "less than one step of the global batch",
        ),  # fmt: skip
    ],
)
def test_what_would_stop_three_processes_is_one_line(recipe, overrides, message, capsys) -> None:
    argv = ["train", "--config", str(CONFIGS / recipe), "--check", "--world-size", "3"]
    assert main(argv + overrides) == 2
    assert message in capsys.readouterr().err


def test_epoch_mode_needs_a_shard_per_stream(tmp_path, capsys) -> None:
    write_shards(generate_samples(12, seed=0), tmp_path, samples_per_shard=4)  # 3 shards
    argv = ["train", "--config", str(CONFIGS / "demo.yaml"), "--check", "--world-size"]
    settings = [f"data.train_shards={tmp_path}", "data.resampled=false", "data.workers=1"]
    assert main([*argv, "3", *settings]) == 0
    assert main([*argv, "4", *settings]) == 2
    assert "deals whole shards to 4 streams" in capsys.readouterr().err


def test_world_size_needs_check(capsys) -> None:
    assert main(["train", "--config", str(CONFIGS / "demo.yaml"), "--world-size", "2"]) == 2
    assert "--world-size plans a run: use it with --check" in capsys.readouterr().err
