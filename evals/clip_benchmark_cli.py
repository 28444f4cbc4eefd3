"""CLIP_benchmark's command line under NumPy >= 2.4, for users who evaluate a vlp export with it.

clip-benchmark 1.6.2's ``accuracy`` calls ``float()`` on a 1-element NumPy array, which NumPy >=
2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so its
``clip_benchmark eval`` crashes on zero-shot classification. :func:`numpy_scalar_fix` lends that
module a ``float`` that accepts such arrays for the duration of a call; the computation is
unchanged. Its CLI also imports ``requests`` without declaring it (requirements.txt pins it).

    python -m evals.clip_benchmark_cli eval --model_type open_clip --model local-dir:EXPORT \
        --pretrained none --dataset wds/NAME --dataset_root DIR --no_amp --output result.json

Needs ``clip-benchmark`` (pinned in requirements.txt). The parity tests' reference, CLIP_benchmark
run on given features, lives beside them (``tests/evals/clip_benchmark_reference.py``).
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


def _float(value: Any) -> float:
    """``float()`` that also takes a 1-element array (NumPy < 2.4 behaviour)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return builtins.float(value.item())
    return builtins.float(value)


@contextmanager
def numpy_scalar_fix() -> Iterator[None]:
    """Let clip-benchmark 1.6.2's ``zeroshot_classification.accuracy`` run under NumPy 2.4."""
    from clip_benchmark.metrics import zeroshot_classification as module

    had = "float" in vars(module)
    previous = vars(module).get("float")
    module.float = _float
    try:
        yield
    finally:
        if had:
            module.float = previous
        else:
            del module.float


def main() -> None:
    """CLIP_benchmark's command line, with :func:`numpy_scalar_fix` applied."""
    from clip_benchmark import cli

    with numpy_scalar_fix():
        sys.exit(cli.main())


if __name__ == "__main__":
    main()
