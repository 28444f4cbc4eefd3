"""`vlp train [--check]` and `vlp demo`: the training run's commands, and what other commands
that start a training run share with them (its user errors, its exit status on preemption)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlp.config import Config, ConfigError, load_config

DEMO_RECIPE = Path(__file__).parent / "configs" / "demo.yaml"

EXIT_PREEMPTED = 75
"""`vlp train`'s status after SIGTERM/SIGUSR1 (EX_TEMPFAIL): a checkpoint was written and the
same command with train.resume=latest continues; schedulers can requeue on it."""

EXIT_INTERRUPTED = 130
"""`vlp train`'s status after Ctrl-C (128 + SIGINT, as a shell reports it): a checkpoint was
written and train.resume=latest continues."""


def demo_recipes() -> list[Path]:
    """The demo recipes, one per objective: ``demo.yaml`` (CLIP) and ``*_demo.yaml``."""
    return [DEMO_RECIPE, *sorted(DEMO_RECIPE.parent.glob("*_demo.yaml"))]


def run_errors() -> tuple[type[Exception], ...]:
    """The user errors of a command that starts a run (imported when one is raised: `launch.run`
    takes seconds to import)."""
    from launch.run import StartupError
    from vlp.training import CheckpointWriteError

    return (ConfigError, StartupError, CheckpointWriteError)


def train_command(args: argparse.Namespace) -> int:
    """`vlp train`: train from ``args.config`` plus ``args.overrides``, or with ``args.check``
    run one step and print the plan; 0 when steps ran, `EXIT_PREEMPTED` after a stop signal,
    `EXIT_INTERRUPTED` after Ctrl-C."""
    config = load_config(args.config, args.overrides)  # before launch.run's seconds of imports
    if args.world_size is not None:
        return _plan_world(args, config)
    from launch.run import check, train

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
    if result.interrupted:
        return EXIT_INTERRUPTED if result.stop_signal == "SIGINT" else EXIT_PREEMPTED
    return 0 if result.step > 0 else 1


def _plan_world(args: argparse.Namespace, config: Config) -> int:
    """`vlp train --check --world-size N`: the run planned on N processes, none started."""
    from launch.world_plan import plan_world

    if not args.check:
        raise ConfigError("--world-size plans a run: use it with --check")
    plan = plan_world(config, args.world_size)
    print(f"planned for {plan.world_size} processes (none started, no step run): OK")
    print(f"  global batch:   {plan.global_batch}")
    print(f"  streams:        {plan.streams}")
    print(f"  steps:          {plan.steps}")
    print(f"  samples seen:   {plan.samples_seen}")
    if plan.steps_per_episode is not None:
        print(f"  episode:        {plan.steps_per_episode} steps")
    for note in plan.notes:
        print(f"  not checked:    {note}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from launch.demo import run_demo

    recipe = Path(args.config)
    if not recipe.exists() and (DEMO_RECIPE.parent / recipe).is_file():
        recipe = DEMO_RECIPE.parent / recipe  # a recipe by name: `vlp demo --config x_demo.yaml`
    run_demo(args.out, args.overrides, recipe)
    return 0


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    """Register `vlp train` and `vlp demo`."""
    train = commands.add_parser(
        "train",
        help="pretrain from a YAML config plus key=value overrides",
        description="Pretrain from a YAML config plus section.key=value overrides (an override "
        "wins over the file). Every key, its default and meaning: vlp config --list.",
        epilog="Under accelerate: accelerate launch launch/pretrain.py --config FILE [KEY=VALUE "
        "...]. SIGTERM/SIGUSR1 (exit 75) and Ctrl-C (exit 130) write a checkpoint first; "
        "train.resume=latest continues.",
    )
    train.add_argument("--config", help="YAML run config (e.g. launch/configs/demo.yaml)")
    train.add_argument(
        "--check", action="store_true", help="check config, shards and fields, run one step"
    )
    train.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --check: plan the run on N processes without starting them (global batch, "
        "group size, streams, episodes); no step runs",
    )
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200")
    train.set_defaults(func=train_command, user_errors=run_errors)

    recipes = ", ".join(path.name for path in demo_recipes())
    demo = commands.add_parser(
        "demo",
        help="write procedural shards, train a tiny model, evaluate",
        description="Write procedural shapes shards into OUT/data, train a recipe on them and "
        "evaluate it on held-out shapes; one recipe per objective.",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument(
        "--config",
        default=str(DEMO_RECIPE),
        help=f"a recipe of launch/configs by name ({recipes}) or a path (default: "
        f"{DEMO_RECIPE.name}, CLIP)",
    )
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo config")
    demo.set_defaults(func=_demo, user_errors=run_errors)
