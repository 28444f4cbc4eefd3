"""Which seeds the minutes-long end-to-end tests run."""

from __future__ import annotations

import os


def extra_seeds(*seeds: int) -> tuple[int, ...]:
    """The seeds an end-to-end test runs: the first only, unless ``VLP_TEST_SEEDS=all``. For
    runs of half a minute or more whose property (exact resume) fast tests below them check
    over many stop points, worker counts and both stream modes
    (tests/data_pipelines/test_stream_resume.py): another seed here re-checks the same wiring
    on other data."""
    return seeds if os.environ.get("VLP_TEST_SEEDS") == "all" else seeds[:1]
