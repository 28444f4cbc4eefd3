"""How far a run has come: a tqdm bar on a terminal, and the pace and ETA its log lines report.

Throughput is measured over the steps since the last log line (it follows changes in data or
contention), the ETA from the mean step time since the run (or resume) started (it stays steady).
The bar shows only on a terminal: piped into a file, its ``\\r`` frames would glue onto the log
lines, which carry the same step, losses, samples/s and ETA.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``: an ETA a person reads at a glance."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts optimizer steps from ``first_step`` to ``total``, with a bar when ``show_bar``.

    Args:
        total: ``train.steps``.
        first_step: the step the run starts (or resumes) at.
        global_batch: samples per optimizer step over all ranks.
        show_bar: draw the tqdm bar (the local main process, on a terminal).
    """

    def __init__(self, total: int, first_step: int, global_batch: int, show_bar: bool) -> None:
        self.total = total
        self.first_step = first_step
        self.global_batch = global_batch
        self.bar = tqdm(
            total=total, initial=first_step, desc="train", dynamic_ncols=True, disable=not show_bar
        )
        self.started = self.window_start = time.time()
        self.window_steps = 0

    def advance(self) -> None:
        """One optimizer step done."""
        self.window_steps += 1
        self.bar.update(1)

    def pace(self, step: int) -> tuple[float, float]:
        """Samples per second since the last :meth:`logged`, and the seconds left at ``step``."""
        now = time.time()
        elapsed = max(now - self.window_start, 1e-9)
        per_step = (now - self.started) / (step - self.first_step)
        return self.window_steps * self.global_batch / elapsed, per_step * (self.total - step)

    def logged(self, loss: float) -> None:
        """A log line went out with ``loss``: show it on the bar and start a new pace window."""
        self.bar.set_postfix(loss=f"{loss:.3f}")
        self.window_start, self.window_steps = time.time(), 0

    def seconds(self) -> float:
        """Wall time since the run (or resume) started."""
        return time.time() - self.started

    def close(self) -> None:
        """Take the bar off the terminal."""
        self.bar.close()
