"""Objectives by name: one registry, filled by a decorator on each objective class."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from vlp.objectives.base import Objective

_REGISTRY: dict[str, type[Objective]] = {}
T = TypeVar("T", bound=type[Objective])


def register_objective(name: str) -> Callable[[T], T]:
    """Class decorator that makes an objective available to ``create_objective(name)``."""

    def decorate(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"objective '{name}' is registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_objectives() -> list[str]:
    """Names accepted by ``create_objective`` (and by ``objective.name`` in a config)."""
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The class registered under ``name``, or a ValueError naming the closest valid one."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown objective '{name}'{hint} (available: {', '.join(list_objectives())})"
        )
    return _REGISTRY[name]


def create_objective(name: str, settings: Any = None, **kwargs: Any) -> Objective:
    """Build the objective registered under ``name``: from its resolved ``Config`` instance
    (``config.objective.section()``), or from keyword arguments."""
    cls = objective_class(name)
    return cls.from_config(settings) if settings is not None else cls(**kwargs)
