"""Where a text field's text comes from: a tar member, a json key, or phrases built from the
sample's object annotations; optionally cut to its first clause.

A source is a string, so that it can be written in a config and go into the stream's resume
fingerprint:

- ``txt`` (any member suffix): that member's text;
- ``json:<key>``: the text value of ``<key>`` in the sample's json;
- ``phrases:<key>``: the json list ``<key>`` of objects ``{"tag", "attributes"}`` as
  "attribute ... tag" phrases joined with commas: PyramidCLIP's object-attribute text T_OA
  ("pink pillow, square pink pillow, green couch", Gao et al. 2022, Fig. 2);
- ``first_clause:<source>``: the first clause of another source (up to the first ``,``, ``;``,
  ``:`` or sentence end): PyramidCLIP's fallback summary when a sample has none.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

JSON_PREFIX = "json:"
PHRASES_PREFIX = "phrases:"
FIRST_CLAUSE_PREFIX = "first_clause:"
_CLAUSE_END = re.compile(r"[,;:.!?](\s|$)")


class MissingText(LookupError):
    """The sample has no text for this source (member or json key absent, no objects)."""


@dataclass(frozen=True)
class TextSource:
    """A parsed source string (see the module docstring)."""

    kind: str
    """``member``, ``json`` or ``phrases``."""
    key: str
    """The member suffix or the json key."""
    first_clause: bool = False

    @classmethod
    def parse(cls, source: str) -> TextSource:
        """Parse ``source``; ValueError on an empty key."""
        first = source.startswith(FIRST_CLAUSE_PREFIX)
        rest = source.removeprefix(FIRST_CLAUSE_PREFIX)
        kind, key = "member", rest
        for name, prefix in (("json", JSON_PREFIX), ("phrases", PHRASES_PREFIX)):
            if rest.startswith(prefix):
                kind, key = name, rest[len(prefix) :]
        if not key:
            raise ValueError(
                f"source must be a member suffix or a key, got {source!r} (e.g. 'txt', 'json:summary', "
                "'phrases:objects', 'first_clause:txt')"
            )
        return cls(kind, key, first)

    @property
    def json_key(self) -> str | None:
        """The json key read, or None for a member."""
        return None if self.kind == "member" else self.key

    def read(self, member: Callable[[str], str | None], meta: Any) -> str:
        """The text, from ``member(suffix)`` (None when absent) and the parsed json ``meta``.

        Raises:
            MissingText: the member, key or objects are absent; ValueError: present but not
                text (or not a list of objects).
        """
        if self.kind == "member":
            text = member(self.key)
            if text is None:
                raise MissingText(f"member '{self.key}'")
        else:
            value = meta.get(self.key) if isinstance(meta, dict) else None
            if value is None:
                raise MissingText(f"json key '{self.key}'")
            text = object_phrases(value) if self.kind == "phrases" else value
            if not isinstance(text, str):
                raise ValueError(f"json key '{self.key}' is not text")
        return first_clause(text) if self.first_clause else text


def caption_source(text_key: str = "txt", caption_field: str | None = None) -> str:
    """The source of the user's caption: ``json:<caption_field>`` when a json field is named
    (``data.caption_field`` wins, as in training), else the member ``text_key``
    (``data.text_key``). Training and the per-caption sidecars (which record it) both use it."""
    return f"{JSON_PREFIX}{caption_field}" if caption_field else text_key


def object_phrases(objects: Any) -> str:
    """``[{"tag": "pillow", "attributes": ["pink"]}, ...]`` -> ``"pink pillow, ..."``.

    Raises:
        MissingText: an empty list (no objects to describe); ValueError: not a list of objects
            with a text ``tag`` and a list of text ``attributes`` (optional).
    """
    if not isinstance(objects, list):
        raise ValueError("objects are not a list")
    phrases = []
    for item in objects:
        tag = item.get("tag") if isinstance(item, dict) else None
        attributes = item.get("attributes", []) if isinstance(item, dict) else None
        if not isinstance(tag, str) or not isinstance(attributes, list):
            raise ValueError(f"object {item!r} has no text 'tag' or a non-list 'attributes'")
        phrases.append(" ".join([*map(str, attributes), tag]))
    if not phrases:
        raise MissingText("objects (the list is empty)")
    return ", ".join(phrases)


def first_clause(text: str) -> str:
    """The text up to its first clause end (``,`` ``;`` ``:`` or sentence end), stripped."""
    match = _CLAUSE_END.search(text)
    return (text[: match.start()] if match else text).strip()
