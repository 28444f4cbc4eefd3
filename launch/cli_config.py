"""`vlp config --list [--objective NAME]`: every config key with its default and meaning,
generated from the config dataclasses (:mod:`vlp.config_reference`)."""

from __future__ import annotations

import argparse


def _config(args: argparse.Namespace) -> int:
    from vlp.config_reference import config_keys, format_keys

    if not args.list:
        args.parser.error("give --list (every key, its default and meaning)")
    objectives = None if args.objective is None else [args.objective]
    print(format_keys(config_keys(objectives)), end="")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    return (ValueError,)  # an unknown objective name, with the closest registered one


def add_config_command(commands: argparse._SubParsersAction) -> None:
    """Register `vlp config`."""
    config = commands.add_parser(
        "config",
        help="list every config key with its default and meaning",
        description="Every key of a run config (YAML sections or section.key=value overrides), "
        "its default and its meaning, generated from the config dataclasses.",
    )
    config.add_argument(
        "--list", action="store_true", help="print every key, its default and meaning"
    )
    config.add_argument(
        "--objective",
        metavar="NAME",
        help="only this objective's section (objective.NAME.*); default: every objective's",
    )
    config.set_defaults(func=_config, user_errors=_user_errors, parser=config)
