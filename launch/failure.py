"""A failure on any rank reaches the user once, named by the rank that failed first.

Under ``accelerate launch`` (torchrun's elastic agent) every rank is a process of its own, and
the launcher stops them all as soon as one exits with an error. A config error meets every rank
at once; an error on one rank makes its peers fail in turn ("Connection closed by peer").
Printing on every rank would bury the cause under its echoes; printing on rank 0 only loses a
failure that happens on another rank. So the first rank to fail claims the report, by creating a
file exclusively in the launcher's folder for this attempt (shared by the ranks of one node, each
node's launcher printing to its own terminal), prints it and writes it to its torchelastic error
file, which the launcher's closing summary reads ("Root Cause (first observed failure)"). The
ranks that fail later stay quiet and wait a moment before exiting, so that the launcher sees the
first failure alone and stops them itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_ECHO_DELAY_S = 5.0
"""How long a rank that did not fail first waits before it exits (the launcher stops it)."""

_CLAIM_FILE = "vlp-first-failure"


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, from the launcher's environment."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def report_failure(error: str, *, details: str | None = None) -> None:
    """Print ``vlp: error: <error>`` (``details``, e.g. a traceback, above it) on stderr once per
    job, naming the rank when there are several, and record it for the launcher's summary; on a
    rank that did not fail first, print nothing and wait for the launcher to stop this process."""
    rank, world = rank_and_world()
    where = f"rank {rank} of {world}: " if world > 1 else ""
    message = f"vlp: error: {where}{error}"
    if not _claim_first_failure():
        time.sleep(_ECHO_DELAY_S)
        return
    print(f"{details.rstrip()}\n{message}" if details else message, file=sys.stderr, flush=True)
    _record_for_torchrun(message, details or message)


def _claim_first_failure() -> bool:
    """Whether this rank is the first of its node to fail (always true without a launcher)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return True
    claim = Path(error_file).parent.parent / _CLAIM_FILE  # <run>/attempt_<n>/<rank>/error.json
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    except OSError:  # no such folder, read-only: better twice than never
        return True
    os.write(fd, str(rank_and_world()[0]).encode())
    os.close(fd)
    return True


def _record_for_torchrun(message: str, callstack: str) -> None:
    """Put the failure where torchrun's summary looks (the worker's error file, in
    torch.distributed.elastic's JSON layout), so that the summary ending the launcher's output
    names the cause instead of "To enable traceback see: ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {
        "message": message,
        "extraInfo": {"py_callstack": callstack, "timestamp": str(int(time.time()))},
    }
    with open(path, "w") as f:
        json.dump({"message": record}, f)
