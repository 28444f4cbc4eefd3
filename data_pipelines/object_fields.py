"""The format of a sample's ``summary`` and ``objects`` json keys, checked in one place.

``vlp shards attach`` checks records before it writes them and ``vlp shards validate`` checks
shards already written, with this one function, so a field that one accepts the other does too:

- ``summary``: text.
- ``objects``: a list of ``{"box": [x0, y0, x1, y1], "tag": str, "attributes": [str, ...]}``
  with an optional ``"feature": [float, ...]``. Boxes are normalised to [0, 1] (x right, y
  down) with x0 < x1 and y0 < y1; the features of one sample's objects all have one length.
  Other keys of an object (a detector's ``score``) are kept as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class FieldError(ValueError):
    """A ``summary`` or ``objects`` value that breaks the format; ``field`` says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_number(value: Any) -> bool:
    """A finite JSON number (json.loads reads NaN and Infinity; bool is an int in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _box_error(box: Any) -> str | None:
    if not isinstance(box, list) or len(box) != 4 or not all(map(_is_number, box)):
        return f"box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}"
    if not all(0.0 <= v <= 1.0 for v in box):
        return f"box {box} is not normalised to [0, 1] (divide pixels by the image width/height)"
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        return f"box {box} needs x0 < x1 and y0 < y1"
    return None


def _object_error(item: Any) -> str | None:
    if not isinstance(item, dict):
        return f"is not an object with box, tag and attributes: {item!r}"
    box_error = _box_error(item.get("box"))
    if box_error is not None:
        return box_error
    if not isinstance(item.get("tag"), str):
        return f"tag must be text, got {item.get('tag')!r}"
    attributes = item.get("attributes")
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        return f"attributes must be a list of text, got {attributes!r}"
    feature = item.get("feature")
    if "feature" in item and not (
        isinstance(feature, list) and feature and all(map(_is_number, feature))
    ):
        return "feature must be a non-empty list of finite numbers"
    return None


def _check_objects(objects: Any) -> None:
    if not isinstance(objects, list):
        raise FieldError("objects", f"objects must be a list, got {type(objects).__name__}")
    lengths: dict[int, int] = {}  # feature length -> first object index with it
    for index, item in enumerate(objects):
        error = _object_error(item)
        if error is not None:
            raise FieldError("objects", f"objects[{index}]: {error}")
        if "feature" in item:
            lengths.setdefault(len(item["feature"]), index)
    if len(lengths) > 1:
        seen = ", ".join(f"{n} (objects[{i}])" for n, i in sorted(lengths.items()))
        raise FieldError("objects", f"features of unequal length: {seen}")


def check_fields(fields: Mapping[str, Any]) -> None:
    """Check ``fields``' ``summary`` and ``objects`` (when present) against the format above.

    Other keys are not looked at: they pass through as they are.

    Raises:
        FieldError: the first thing wrong, naming the object (``objects[2]: box ...``).
    """
    if "summary" in fields and not isinstance(fields["summary"], str):
        summary = fields["summary"]
        raise FieldError("summary", f"summary must be text, got {type(summary).__name__}")
    if "objects" in fields:
        _check_objects(fields["objects"])
