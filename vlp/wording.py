"""Counts in words for what a user reads: ``1 shard``, ``2 shards``, ``2 processes``."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, in ``plural`` (default: ``noun`` + ``s``) unless ``n`` is 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"
