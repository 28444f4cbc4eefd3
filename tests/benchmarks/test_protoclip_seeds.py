"""benchmarks/protoclip_seeds.py's ``--variants``: only the named rows are trained, and the
published command says so (a re-measured row must be reproducible by itself)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import protoclip_seeds  # noqa: E402


def test_variants_selects_rows_and_the_command_names_them() -> None:
    every = protoclip_seeds.parse_args([])
    assert every.variants == list(protoclip_seeds.VARIANTS)
    assert "--variants" not in protoclip_seeds.markdown([], every, "machine")
    one = protoclip_seeds.parse_args(["--steps", "300", "--variants", "protoclip"])
    assert one.variants == ["protoclip"]
    section = " ".join(protoclip_seeds.markdown([], one, "machine").split())  # unwrapped
    assert "--steps 300 --seeds 0 1 2 --variants 'protoclip'`" in section
    with pytest.raises(SystemExit):
        protoclip_seeds.parse_args(["--variants", "siglip"])
