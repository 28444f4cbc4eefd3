"""The `vlp` command: `vlp demo`, `vlp train [--check]` — thin shells over tested functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vlp.config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    from launch.run import check, train

    config = load_config(args.config, args.overrides)
    if args.check:
        plan = check(config)
        print("config, shards and sample fields OK; one training step ran.")
        print(f"  model:          {plan.model} ({plan.parameters / 1e6:.1f}M parameters)")
        print(f"  objective:      {plan.objective} (first-step loss {plan.first_step_loss:.4f})")
        print(f"  processes:      {plan.world_size}")
        print(f"  global batch:   {plan.global_batch}")
        print(f"  steps:          {plan.steps}")
        print(f"  samples seen:   {plan.samples_seen}")
        print(f"  train shards:   {plan.train_shards}")
        print(f"  output dir:     {plan.out_dir}")
        return 0
    result = train(config)
    return 0 if result.step > 0 or result.interrupted else 1


def _demo(args: argparse.Namespace) -> int:
    from launch.demo import run_demo

    run_demo(args.out, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `vlp` (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="pretrain from a YAML config plus key=value overrides"
    )
    train.add_argument("--config", help="YAML run config (e.g. launch/configs/demo.yaml)")
    train.add_argument("--check", action="store_true", help="validate, run one step, print plan")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200")
    train.set_defaults(func=_train)

    demo = commands.add_parser("demo", help="write synthetic shards, train a tiny CLIP, evaluate")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo config")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `vlp` with ``argv``; user errors print one line and return 2, no traceback."""
    from launch.run import StartupError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, StartupError) as error:
        print(f"vlp: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
