"""`vlp watch RUN_DIR`: a live table of a run, read from the files the trainer writes.

Sources, all in the run directory, all optional except one of the first two:

- ``config.yaml``: ``train.steps``, to show progress and to know when the run is finished;
- ``metrics.jsonl``: one JSON object per logged step (``step``, ``train/loss``, ``train/lr``,
  ``train/samples_per_s``, other ``train/*``, and ``eval/<dataset>/<metric>`` where evals ran);
- ``data_skips_rank*.json``: bad samples each rank skipped (written with each checkpoint);
- ``results/*.json``: CLIP_benchmark-shaped eval results, shown when ``metrics.jsonl`` has no
  ``eval/`` keys.

Nothing here imports torch, so the command starts at once and can run beside the training job.

Example::

    vlp watch runs/demo --interval 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
SPARK = "▁▂▃▄▅▆▇█"
CLEAR = "\x1b[H\x1b[2J"


class NotARunError(ValueError):
    """A folder without the files a vlp run writes; the message names it and what was expected."""


@dataclass
class RunState:
    """What the run's files say at one moment."""

    run_dir: Path
    total_steps: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The logged steps (``metrics.jsonl``), oldest first."""
    skipped: int = 0
    used: int = 0
    skipped_shards: int = 0
    eval_step: int | None = None
    evals: dict[str, float] = field(default_factory=dict)
    """``dataset/metric`` -> value of the newest eval."""
    updated_s: float | None = None
    """Seconds since ``metrics.jsonl`` last changed."""

    @property
    def step(self) -> int | None:
        return int(self.rows[-1]["step"]) if self.rows else None

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and (self.step or 0) >= self.total_steps


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # being written, or not ours: the next refresh reads it again


def _total_steps(run_dir: Path) -> int | None:
    import yaml

    try:
        config = yaml.safe_load((run_dir / CONFIG_NAME).read_text()) or {}
        steps = (config.get("train") or {}).get("steps")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The logged steps; a last line still being written is left for the next refresh."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _step_of(result: dict[str, Any]) -> int:
    """The step of a result the trainer wrote (``pretrained: step_N``); -1 when unknown."""
    tail = str(result.get("pretrained", "")).rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _latest_eval(state: RunState) -> None:
    for row in reversed(state.rows):
        evals = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
        if evals:
            state.eval_step, state.evals = int(row["step"]), evals
            return
    from evals.model_card import read_results

    results = read_results(state.run_dir)
    if results:
        newest = max(_step_of(result) for result in results)
        state.eval_step = newest if newest >= 0 else None
        for result in (r for r in results if _step_of(r) == newest):
            for metric, value in result["metrics"].items():
                state.evals[f"{result['dataset']}/{metric}"] = value


def read_run(run_dir: str | Path) -> RunState:
    """Read a run directory's files into a :class:`RunState`.

    Raises:
        NotARunError: ``run_dir`` is missing or has neither ``config.yaml`` nor ``metrics.jsonl``.
    """
    path = Path(run_dir)
    metrics = path / METRICS_NAME
    if not path.is_dir() or not ((path / CONFIG_NAME).is_file() or metrics.is_file()):
        raise NotARunError(
            f"'{run_dir}' is not a vlp run directory: it has no {CONFIG_NAME} or {METRICS_NAME} "
            "(give a run's train.out_dir, e.g. runs/demo)"
        )
    state = RunState(run_dir=path, total_steps=_total_steps(path), rows=_read_rows(metrics))
    if metrics.is_file():
        state.updated_s = max(0.0, time.time() - metrics.stat().st_mtime)
    shards: set[str] = set()
    for skips_file in sorted(path.glob("data_skips_rank*.json")):
        counts = _read_json(skips_file)
        if isinstance(counts, dict):
            state.skipped += int(counts.get("skipped", 0))
            state.used += int(counts.get("ok", 0))
            shards.update(k for k, v in (counts.get("by_shard") or {}).items() if v)
    state.skipped_shards = len(shards)
    _latest_eval(state)
    return state


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3e}" if value and abs(value) < 1e-3 else f"{value:.4g}"


def sparkline(values: list[float], width: int = 24) -> str:
    """The last ``width`` values as block characters, lowest to highest of those shown."""
    shown = [v for v in values[-width:] if math.isfinite(v)]
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    scale = (len(SPARK) - 1) / (high - low) if high > low else 0.0
    return "".join(SPARK[round((v - low) * scale)] for v in shown)


def render(state: RunState) -> str:
    """The compact table `vlp watch` prints."""
    step, total = state.step, state.total_steps
    progress = "no step logged yet" if step is None else f"step {step:,}"
    if step is not None and total:
        progress += f" / {total:,} ({100 * step / total:.0f}%)"
    status = "finished" if state.finished else "running"
    if state.updated_s is not None and not state.finished:
        status += f", last log {state.updated_s:.0f}s ago"
    lines = [f"{state.run_dir}  {progress}  [{status}]"]
    trained = [row for row in state.rows if any(k.startswith("train/") for k in row)]
    if trained:  # the newest training row: an eval logs a line of its own after it
        last = trained[-1]
        keys = ["train/loss", *sorted(k for k in last if k.endswith("_loss") and k != "train/loss")]
        keys += [k for k in ("train/lr", "train/samples_per_s") if k in last]
        keys += sorted(k for k in last if k.startswith("train/") and k not in keys)
        width = max(len(k) for k in keys) - len("train/") + 2
        for key in (k for k in keys if k in last):
            line = f"  {key.removeprefix('train/'):<{width}}{_number(last[key]):>12}"
            if key.endswith("loss"):
                history = [float(r[key]) for r in trained if isinstance(r.get(key), int | float)]
                line += f"  {sparkline(history)}  (first {_number(history[0])})"
            lines.append(line)
    if state.used or state.skipped:
        share = state.skipped / max(state.used + state.skipped, 1)
        lines.append(
            f"  data skips  {state.skipped:,} of {state.used + state.skipped:,} samples "
            f"({share:.2%}) in {state.skipped_shards} shards (data_skips_rank*.json)"
        )
    else:
        lines.append("  data skips  none recorded")
    if state.evals:
        at = f" at step {state.eval_step:,}" if state.eval_step is not None else ""
        lines.append(f"eval{at}")
        width = max(len(k) for k in state.evals) + 2
        lines += [f"  {k:<{width}}{_number(v):>12}" for k, v in sorted(state.evals.items())]
    return "\n".join(lines)


def watch(
    run_dir: str | Path,
    *,
    interval: float = 5.0,
    once: bool = False,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the run's table every ``interval`` seconds until it finishes (or once); return 0.

    On a terminal each refresh redraws the screen; into a pipe or file each refresh is one block
    followed by a blank line. A finished run (last logged step == ``train.steps``) ends the watch
    with a summary.

    Raises:
        NotARunError: ``run_dir`` is not a run directory.
    """
    stream = out if out is not None else sys.stdout
    redraw = stream.isatty()
    while True:
        state = read_run(run_dir)
        block = render(state)
        if state.finished:
            block += f"\nfinished: {state.step:,} steps; metrics in {state.run_dir / METRICS_NAME}"
        stream.write((CLEAR if redraw else "") + block + ("\n" if redraw else "\n\n"))
        stream.flush()
        if once or state.finished:
            return 0
        sleep(interval)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _watch_command(args: argparse.Namespace) -> int:
    try:
        return watch(args.run_dir, interval=args.interval, once=args.once)
    except KeyboardInterrupt:
        return 130


def add_watch_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `vlp watch RUN_DIR [--interval S] [--once]` on `vlp`'s subcommand parsers."""
    parser = subparsers.add_parser(
        "watch", help="live table of a run: losses, lr, samples/s, data skips, latest eval"
    )
    parser.add_argument("run_dir", help="the run's train.out_dir (config.yaml, metrics.jsonl)")
    parser.add_argument(
        "--interval", type=_positive_float, default=5.0, help="seconds between refreshes (5)"
    )
    parser.add_argument("--once", action="store_true", help="print the table once and exit")
    parser.set_defaults(func=_watch_command, user_errors=lambda: (NotARunError,))
