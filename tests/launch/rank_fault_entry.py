"""`launch/pretrain.py` with a fault injected on one rank only, for the multi-rank failure tests:
``VLP_TEST_FAULT=user|bug`` and ``VLP_TEST_FAULT_RANK=r`` make rank r's first training step
raise, the user error (too many bad samples) through vlp's own path, the bug as a RuntimeError.
"""

from __future__ import annotations

import os
import sys

from data_pipelines.stream import TooManyBadSamples
from launch.cli import main
from vlp.training import Trainer

FAULTS = {
    "user": TooManyBadSamples("injected on this rank: 9 of 10 samples skipped, worst shards: x"),
    "bug": RuntimeError("injected bug on this rank"),
}

if os.environ.get("RANK") == os.environ["VLP_TEST_FAULT_RANK"]:

    def failing_step(self: Trainer, *args: object, **kwargs: object) -> object:
        raise FAULTS[os.environ["VLP_TEST_FAULT"]]

    Trainer.train_step = failing_step  # type: ignore[method-assign,assignment]

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
