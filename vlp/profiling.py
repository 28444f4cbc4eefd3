"""Peak host memory of a piece of work, for memory tests and benchmarks (Linux).

The kernel keeps each process's peak resident set size (``VmHWM``) and lets the process reset it
(writing 5 to ``/proc/self/clear_refs``). The peak growth of a call is then ``VmHWM`` after it
minus ``VmRSS`` before it: every page the call touched at its worst moment, whatever allocator
handed it out. Run it in a fresh process so that earlier work does not leave freed-but-cached
memory behind that the call could reuse unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in {_STATUS}")


def peak_rss_growth(work: Callable[[], T]) -> tuple[T, int]:
    """Run ``work()``; return its result and the growth of peak RSS during it, in bytes.

    Raises:
        RuntimeError: not on Linux, or the kernel refuses to reset the peak.
    """
    if not _STATUS.exists():
        raise RuntimeError("peak_rss_growth needs Linux /proc")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    if _status_kib("VmHWM") > before + 1024:
        raise RuntimeError("the kernel did not reset the peak RSS (/proc/self/clear_refs)")
    result = work()
    return result, (_status_kib("VmHWM") - before) * 1024
