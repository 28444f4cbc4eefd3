"""`vlp --help`, `vlp --version` and `vlp config --list`: every option and every config key is
described, and the listing is generated from the code it describes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_parser, main
from vlp.config import load_config
from vlp.config_reference import UNDOCUMENTED, config_keys, field_docs
from vlp.objectives.registry import list_objectives

REPO = Path(__file__).resolve().parents[2]


def _parsers(parser: argparse.ArgumentParser, name: str = "vlp"):  # type: ignore[no-untyped-def]
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {command}")


def test_every_option_of_every_command_says_what_it_does() -> None:
    undescribed = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in _parsers(build_parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert undescribed == []


def test_every_config_key_has_a_meaning() -> None:
    keys = config_keys()
    assert {k.key for k in keys if k.meaning == UNDOCUMENTED} == set()
    sections = {k.key.split(".")[0] for k in keys}
    assert sections == {"model", "data", "objective", "optim", "train", "eval"}
    with_keys = {k.key.split(".")[1] for k in keys if k.key.count(".") == 2}
    assert with_keys == set(list_objectives()) - {"siglip"}  # SigLIP has no settings
    (name,) = [k for k in keys if k.key == "objective.name"]
    assert name.meaning.endswith(f"One of: {', '.join(list_objectives())}.")


def test_every_listed_key_is_a_real_key_with_its_real_default() -> None:
    """Each key given back its listed default loads, and leaves the config as the default one."""
    default = load_config().to_dict()
    for key in config_keys():
        config = load_config(None, [f"{key.key}={json.dumps(key.default)}"]).to_dict()
        section, *rest = key.key.split(".")
        if section == "objective" and len(rest) == 2:  # a section that is not the chosen one
            assert config["objective"][rest[0]][rest[1]] == key.default
            continue
        assert config == default, key.key


def test_config_list_prints_keys_defaults_and_meanings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--list"]) == 0
    text = capsys.readouterr().out
    assert "data.batch_timeout = 600.0\n    Seconds to wait for one batch" in text
    assert 'data.image_keys = ["jpg", "jpeg", "png", "webp"]\n' in text
    assert "train.group_size = null\n    Ranks per contrastive group" in text
    assert "objective.convirt.lam = 0.75\n" in text and "objective.protoclip.k = 20000\n" in text
    assert main(["config", "--list", "--objective", "convirt"]) == 0
    text = capsys.readouterr().out
    assert "objective.convirt.text_source" in text and "objective.protoclip." not in text
    assert main(["config", "--list", "--objective", "convrt"]) == 2
    assert "did you mean 'convirt'" in capsys.readouterr().err


def test_field_docs_reads_attribute_docstrings_only() -> None:
    from dataclasses import dataclass

    @dataclass
    class Section:
        """A section."""

        documented: int = 1
        """What it does,
        over two lines."""
        bare: int = 2
        after_bare: int = 3
        """Only this one's."""

    assert field_docs(Section) == {
        "documented": "What it does, over two lines.",
        "after_bare": "Only this one's.",
    }


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("vlp 0.")


def test_a_config_mistake_is_reported_before_torch_is_imported() -> None:
    """A typo in a key took ~6 s to report: torch was imported before the config was read."""
    code = (
        "import sys; from launch.cli import main; "
        "rc = main(['train', '--config', 'launch/configs/demo.yaml', 'data.batchsize=3']); "
        "print(rc, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.stdout == "2 False\n", done.stderr
    assert "unknown config key 'data.batchsize'; did you mean 'batch_size'?" in done.stderr


def test_vlp_demo_takes_a_recipe_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import launch.demo

    ran: list[Path] = []
    monkeypatch.setattr(launch.demo, "run_demo", lambda out, overrides, recipe: ran.append(recipe))
    assert main(["demo", "--config", "convirt_demo.yaml", "--out", "unused"]) == 0
    assert ran == [REPO / "launch" / "configs" / "convirt_demo.yaml"]
