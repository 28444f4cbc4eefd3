"""The `vlp` command: `vlp demo`, `vlp train [--check]`, `vlp config --list`, `vlp shards
write|validate|inspect|attach`, `vlp prior train-reference|weights`, `vlp protoclip teacher`,
`vlp eval zeroshot|retrieval|linear-probe|captioning`, `vlp export`, `vlp watch`: thin shells
over tested functions."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import traceback
from collections.abc import Sequence

from launch.cli_config import add_config_command
from launch.cli_prior import add_prior_command
from launch.cli_protoclip import add_protoclip_command
from launch.cli_shards import add_shards_command
from launch.cli_train import EXIT_PREEMPTED, add_train_commands
from launch.evaluate import add_eval_commands, add_export_command
from launch.failure import rank_and_world, report_failure
from launch.watch import add_watch_command
from vlp.config import ConfigError

__all__ = ["EXIT_PREEMPTED", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `vlp` (exposed for tests and docs).

    Each command family registers itself from a module of its own: `launch/cli_train.py`
    (train, demo), `launch/cli_shards.py`, `launch/cli_prior.py`, `launch/cli_protoclip.py`,
    `launch/evaluate.py` (eval, export) and `launch/watch.py`; this module keeps the entry and
    `main`'s error handling.
    """
    parser = argparse.ArgumentParser(
        prog="vlp",
        description="Contrastive vision-language pretraining: write shards, train, evaluate, "
        "export. Start with `vlp demo`; `vlp COMMAND --help` describes each command and "
        "`vlp config --list` every config key.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    add_train_commands(commands)
    add_config_command(commands)
    add_shards_command(commands)
    add_prior_command(commands)
    add_protoclip_command(commands)
    add_eval_commands(commands)
    add_export_command(commands)
    add_watch_command(commands)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("vlp")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `vlp` with ``argv``; user errors print one line and return 2, no traceback.

    Each command names its user errors lazily (``user_errors``), so that `vlp shards` does not
    pay the seconds `launch.run` takes to import. Under a launcher with several ranks, a bug's
    traceback is reported like a user error (once, by the first rank to fail; status 1): the
    ranks it brings down with it would otherwise print theirs above and below it.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as error:
        # A config error is always the user's; checked first, since `user_errors()` may import
        # what the command would have run (seconds of torch for a typo in a key).
        if isinstance(error, ConfigError) or isinstance(error, args.user_errors()):
            report_failure(str(error))
            return 2
        if rank_and_world()[1] == 1:
            raise
        report_failure(f"{type(error).__name__}: {error}", details=traceback.format_exc())
        return 1


if __name__ == "__main__":
    sys.exit(main())
