"""The saved position of the training stream, across ranks and versions.

Each rank's ``TrainStream.state_dict()`` holds its own canonical streams' positions
(``data_rank<r>.json``). A resume on another number of processes, micro-steps or workers
needs them all: :func:`merge_states` joins them into one, which every rank loads, taking its
own streams from it. Positions written before canonical streams (version 2: one logical worker
per (rank, worker), one micro-batch per step) are converted on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

STATE_VERSION = 3
"""3: positions per canonical stream; 2: per (rank, worker), one micro-batch per step only."""


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One position from the ``state_dict()`` of every rank (or of one): every stream's
    position, the step in the epoch, and each rank's counts, for a resume on any number of
    processes, micro-steps and workers (:meth:`TrainStream.load_state_dict`). Positions saved
    before canonical streams (version 2, one micro-batch per step) are converted: rank r's
    worker w was stream (slot r, phase w).

    Raises:
        ValueError: an unknown version, or a position saved inside a step."""
    merged: dict[str, Any] = {"positions": {}, "ranks": []}
    for state in states:
        version = state.get("version")
        if version == 2:
            state = _from_version_2(state)
        elif version != STATE_VERSION:
            raise ValueError(
                f"the saved data position has version {version}; this vlp reads "
                f"{STATE_VERSION} and 2: resume with the vlp that wrote it, or start a new "
                "train.out_dir"
            )
        steps, left = divmod(int(state["consumed_in_epoch"]), int(state["accum_steps"]))
        if left:
            raise ValueError("the saved data position is not at the end of a step")
        merged.setdefault("version", version)
        for key in ("fingerprint", "slots", "period", "epoch", "fields", "redrawn_at", "view_salt"):
            merged.setdefault(key, state.get(key))
        merged.setdefault("steps_in_epoch", steps)
        merged["positions"].update(state["positions"])
        merged["ranks"].append(
            {"rank": int(state["rank"]), "dropped": state["dropped"], "skips": state["skips"]}
        )
    for key in ("fields", "redrawn_at", "view_salt"):
        if merged.get(key) is None:
            merged.pop(key, None)
    return merged


def _from_version_2(state: dict[str, Any]) -> dict[str, Any]:
    """A version-2 position (rank r's logical workers w) as version 3 (streams (r, w))."""
    slots, period, rank = int(state["world_size"]), int(state["workers"]), int(state["rank"])
    positions = {str(int(w) * slots + rank): p for w, p in state["positions"].items()}
    return {**state, "accum_steps": 1, "slots": slots, "period": period, "positions": positions}
