"""open_clip_train's own command line (``python -m open_clip_train.main``) with a model config
from a JSON file registered first, so that both sides of ``digits_end_to_end.py`` train the same
architecture. Runs in open_clip's environment (``.venv-openclip``, ``make bench-peer``); imports
nothing of vlp.

    .venv-openclip/bin/python benchmarks/openclip_main_peer.py CONFIG.json -- ARGS...
"""

from __future__ import annotations

import sys

import open_clip
from open_clip_train.main import main as open_clip_train_main


def main(argv: list[str]) -> None:
    """Register ``argv[0]`` (a model-config JSON named after its model) and run open_clip_train's
    ``main`` on the arguments after ``--``."""
    config, separator, *train_args = argv
    if separator != "--":
        raise SystemExit(__doc__)
    open_clip.add_model_config(config)
    open_clip_train_main(train_args)


if __name__ == "__main__":
    main(sys.argv[1:])
