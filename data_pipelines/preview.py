"""Look at the first samples of a set of shards: as text, and as a PNG grid of captioned images.

``vlp shards inspect`` uses this to show what a model will be trained on, decoded with the
stream's own rules (:mod:`data_pipelines.decode`). The grid is drawn on matplotlib's Agg canvas
directly, never through ``pyplot`` (no screen, no global backend switched).
"""

from __future__ import annotations

import math
import os
import textwrap
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from data_pipelines.decode import (
    DATA_ERRORS,
    IMAGE_MEMBERS,
    SampleError,
    decode_caption,
    decode_image,
)
from data_pipelines.shards import Urls, expand_urls
from data_pipelines.tario import iter_samples

THUMBNAIL_SIDE = 256


@dataclass
class Preview:
    """One sample as shown: where it is, its members' sizes, its caption and a thumbnail."""

    url: str
    key: str
    members: dict[str, int]
    """Member suffix -> size in bytes."""
    caption: str
    image: Image.Image | None
    problems: list[str]
    """Why the image or the caption could not be decoded (empty when both could)."""


def _preview(url: str, key: str, members: dict[str, bytes], caption_key: str) -> Preview:
    problems = []
    caption, image = "", None
    try:
        caption = decode_caption(members[caption_key]) if caption_key in members else ""
    except SampleError as error:
        problems.append(str(error))
    image_key = next((k for k in IMAGE_MEMBERS if k in members), None)
    if image_key is None:
        problems.append("no image member")
    else:
        try:
            image = decode_image(members[image_key], draft_size=THUMBNAIL_SIDE)
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        except SampleError as error:
            problems.append(str(error))
    sizes = {suffix: len(data) for suffix, data in sorted(members.items())}
    return Preview(url, key, sizes, caption, image, problems)


def first_samples(urls: Urls, n: int = 16, *, caption_key: str = "txt") -> list[Preview]:
    """The first ``n`` samples of the shards, in order, decoded for display.

    Raises:
        FileNotFoundError: no shard matches ``urls`` or a local shard is missing.
        SampleError: a shard that cannot be read as a tar (``vlp shards validate`` says more).
    """
    if n <= 0:
        raise ValueError(f"first_samples: n must be > 0, got {n}")
    previews: list[Preview] = []
    for url in expand_urls(urls):
        try:
            with closing(wds.gopen(url)) as stream:
                for sample in iter_samples(stream, url):
                    previews.append(_preview(url, sample.key, sample.members, caption_key))
                    if len(previews) == n:
                        return previews
        except DATA_ERRORS as error:
            raise SampleError(f"shard {url} cannot be read: {error!r}", url=url) from error
    return previews


def describe(previews: list[Preview]) -> str:
    """The samples as text: key, shard, image size and members, then the caption."""
    lines = []
    for p in previews:
        size = f"{p.image.width}x{p.image.height} shown" if p.image is not None else "no image"
        members = " ".join(f"{suffix}({n} B)" for suffix, n in p.members.items())
        lines.append(f"{p.key}  {os.path.basename(p.url)}  {size}  {members}")
        lines.append(f"    caption: {p.caption!r}")
        lines.extend(f"    problem: {problem}" for problem in p.problems)
    return "\n".join(lines)


def write_grid(previews: list[Preview], path: str | os.PathLike[str], *, columns: int = 4) -> Path:
    """Draw the samples' images with their key and caption in a grid; save it as a PNG."""
    if not previews:
        raise ValueError("write_grid: no samples to draw")
    columns = min(columns, len(previews))
    rows = math.ceil(len(previews) / columns)
    figure = Figure(figsize=(2.4 * columns, 2.9 * rows))
    FigureCanvasAgg(figure)
    for i, p in enumerate(previews):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.set_axis_off()
        if p.image is not None:
            axes.imshow(np.asarray(p.image))
        else:
            axes.text(0.5, 0.5, "no image", ha="center", va="center", color="red")
        label = p.caption or "; ".join(p.problems)
        title = textwrap.fill(textwrap.shorten(f"{p.key}: {label}", 96), 32)
        axes.set_title(title, fontsize=7)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=100)
    return target
