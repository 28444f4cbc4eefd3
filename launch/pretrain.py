"""Pretraining entry point, for `python launch/pretrain.py` and `accelerate launch launch/pretrain.py`.

    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml launch/pretrain.py \
        --config launch/configs/demo.yaml train.steps=200
"""

from __future__ import annotations

import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
