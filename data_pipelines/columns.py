"""The column names a table may use for each role, and how a role's column is guessed.

One list per role, shared by ``vlp shards write`` (:mod:`data_pipelines.sources`) and the eval
tables (:mod:`data_pipelines.labelled_tables`, read by ``vlp eval``), so a CSV that one command
accepts the other accepts too. A role's column is the one given, else the only header name in
its list; two candidates are ambiguous and raise :class:`ColumnError` naming them and the flag
that picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Role = Literal["image", "caption", "label"]

COLUMNS: dict[Role, tuple[str, ...]] = {
    "image": ("image", "path", "filepath", "filename"),
    "caption": ("caption", "text", "title"),
    "label": ("label", "class", "cls"),
}
"""Accepted names per role; ``--image-column`` etc. name any other column."""


class ColumnError(ValueError):
    """A table whose column for a role is missing or ambiguous; the message names the flag."""


def flag(role: Role) -> str:
    """The command-line flag that names ``role``'s column, e.g. ``--image-column``."""
    return f"--{role}-column"


def find_column(
    header: Sequence[str], role: Role, given: str | None, source: str, *, required: bool = True
) -> str | None:
    """The column of ``header`` that plays ``role``: ``given``, else the one accepted name present.

    Returns None when no accepted name is present and not ``required``. Raises ColumnError when
    ``given`` is not in ``header``, when two accepted names are present, or when none is and
    ``required``.
    """
    columns = ", ".join(map(repr, header))
    if given is not None:
        if given not in header:
            raise ColumnError(f"{source}: no column {given!r} ({flag(role)}); columns: {columns}")
        return given
    found = [name for name in COLUMNS[role] if name in header]
    if len(found) > 1:
        raise ColumnError(
            f"{source}: several {role} columns ({', '.join(map(repr, found))}); choose one "
            f"with {flag(role)}"
        )
    if not found and required:
        raise ColumnError(
            f"{source}: no {role} column (expected one of {', '.join(COLUMNS[role])}; columns: "
            f"{columns}); name it with {flag(role)}"
        )
    return found[0] if found else None
