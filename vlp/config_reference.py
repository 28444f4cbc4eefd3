"""Every config key with its default and meaning, generated from the config dataclasses.

A key's meaning is the docstring under its field (PEP 257's attribute docstrings), read from the
source with :mod:`ast`, so ``vlp config --list`` cannot drift from the code: a field without one
is listed as undocumented, and a test requires one for every field.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
from typing import Any

from vlp.config import Config

UNDOCUMENTED = "(undocumented)"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (whitespace collapsed) for a dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for statement, following in zip(body, body[1:], strict=False):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            if isinstance(following.value.value, str):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One dotted key: its default (as YAML would hold it) and meaning."""

    key: str
    default: Any
    meaning: str


def section_keys(prefix: str, cls: type) -> list[ConfigKey]:
    """The keys of one config dataclass, in declaration order, under ``prefix``."""
    docs = field_docs(cls)
    instance = cls()
    return [
        ConfigKey(f"{prefix}.{f.name}", getattr(instance, f.name), docs.get(f.name, UNDOCUMENTED))
        for f in dataclasses.fields(cls)
        if f.name != "settings"  # ObjectiveConfig's sections are listed per objective
    ]


def config_keys(objectives: list[str] | None = None) -> list[ConfigKey]:
    """Every key of a run config; the objective sections of ``objectives`` (default: every
    registered objective). Importing the objectives imports torch (a few seconds)."""
    from vlp.objectives.registry import list_objectives, objective_class

    keys: list[ConfigKey] = []
    default = Config()
    for section in dataclasses.fields(Config):
        keys += section_keys(section.name, type(getattr(default, section.name)))
    keys = [
        dataclasses.replace(k, meaning=f"{k.meaning} One of: {', '.join(list_objectives())}.")
        if k.key == "objective.name"
        else k
        for k in keys
    ]
    for name in list_objectives() if objectives is None else objectives:
        keys += section_keys(f"objective.{name}", objective_class(name).Config)
    return keys


def format_keys(keys: list[ConfigKey], width: int = 100) -> str:
    """``key = default`` per key, its meaning wrapped and indented below it."""
    lines: list[str] = []
    for key in keys:
        lines.append(f"{key.key} = {json.dumps(key.default)}")
        lines += textwrap.wrap(key.meaning, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"
