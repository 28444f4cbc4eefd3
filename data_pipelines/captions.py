"""Every caption of a list of shards, in order: what the commands that precompute a per-caption
sidecar read (`vlp prior weights`, `vlp protoclip teacher`), so that they read captions exactly
as each other and as training decodes them (whole, from one member or one json key:
:func:`data_pipelines.worker_stream.sample_caption`)."""

from __future__ import annotations

from collections.abc import Iterator

import webdataset as wds

from data_pipelines.decode import SampleError
from data_pipelines.tario import iter_samples
from data_pipelines.worker_stream import sample_caption


def shard_captions(urls: list[str], source: str = "txt") -> Iterator[tuple[str, str, str]]:
    """(shard, sample key, caption) of every sample of the shards, in order; ``source`` is the
    caption's member (``data.text_key``) or ``json:<key>`` (``data.caption_field``), as
    :func:`~data_pipelines.text_sources.caption_source` gives it.

    Raises:
        SampleError: a sample without the caption or with an undecodable one, naming the shard
            and the sample key.
    """
    for url in urls:
        with wds.gopen(url) as stream:
            for sample in iter_samples(stream, url):
                try:
                    caption = sample_caption(sample, source)
                except SampleError as error:
                    raise SampleError(f"shard {url} sample {sample.key}: {error}") from None
                yield url, sample.key, caption
