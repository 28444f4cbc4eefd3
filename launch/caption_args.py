"""The caption-source options of the commands that precompute a per-caption sidecar (`vlp prior
weights`, `vlp protoclip teacher`), and the same options written for a run's ``data`` section:
the command that a start-up refusal names rebuilds the sidecar from the captions the run reads
(``data.text_key`` or ``data.caption_field``)."""

from __future__ import annotations

import argparse
import shlex


def add_caption_source(parser: argparse.ArgumentParser) -> None:
    """``--text-key MEMBER`` (default ``txt``) or ``--caption-field KEY``, as the run's data."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--text-key", default="txt", help="caption member (data.text_key; default: txt)"
    )
    source.add_argument(
        "--caption-field",
        help="read each caption from this key of the sample's json instead (data.caption_field)",
    )


def caption_source_args(text_key: str, caption_field: str | None) -> str:
    """The options of :func:`add_caption_source` (with a leading space; empty for the default
    member ``txt``) that read the captions a run with this ``data.text_key`` /
    ``data.caption_field`` reads."""
    if caption_field:
        return f" --caption-field {shlex.quote(caption_field)}"
    return "" if text_key == "txt" else f" --text-key {shlex.quote(text_key)}"
