"""Every caption of a list of shards, in order: what the commands that precompute a per-caption
sidecar read (`vlp prior weights`, `vlp protoclip teacher`), so that they read captions exactly
as each other and as training decodes them (whole, from one member)."""

from __future__ import annotations

from collections.abc import Iterator

import webdataset as wds

from data_pipelines.decode import SampleError, decode_caption
from data_pipelines.tario import iter_samples


def shard_captions(urls: list[str], text_key: str) -> Iterator[tuple[str, str, str]]:
    """(shard, sample key, caption) of every sample of the shards, in order.

    Raises:
        SampleError: a sample without ``text_key`` or with an undecodable caption, naming the
            shard and the sample key.
    """
    for url in urls:
        with wds.gopen(url) as stream:
            for sample in iter_samples(stream, url):
                if text_key not in sample.members:
                    raise SampleError(f"shard {url} sample {sample.key}: no member '{text_key}'")
                try:
                    caption = decode_caption(sample.members[text_key])
                except SampleError as error:
                    raise SampleError(f"shard {url} sample {sample.key}: {error}") from None
                yield url, sample.key, caption
