"""`evals`, `data_pipelines` and `launch` are names PyPI also uses: they must resolve to this repo."""

from pathlib import Path

import data_pipelines
import evals
import launch
import vlp

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_packages_are_this_repository():
    for package in (vlp, evals, data_pipelines, launch):
        assert Path(package.__file__).resolve().parent.parent == ROOT, package.__file__
