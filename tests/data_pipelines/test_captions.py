"""The captions that the per-caption sidecar commands read (:func:`shard_captions`): from a
member or, as ``data.caption_field`` makes training read them, from a key of the sample's json,
exactly as the training stream reads that text field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from data_pipelines.batch_fields import BatchFields, ImageView, TextField
from data_pipelines.captions import shard_captions
from data_pipelines.decode import SampleError
from data_pipelines.stream import make_train_stream
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.synthetic import generate_samples
from data_pipelines.text_sources import caption_source
from data_pipelines.transforms import TrainTransform
from data_pipelines.write import write_shards
from launch.build import shard_urls

FIELD = "caption"
"""The json key the shards below carry their captions in (``data.caption_field``)."""


def json_caption(sample: dict[str, Any]) -> str:
    """The json caption of a procedural sample: other words than its ``txt`` member."""
    meta = sample["json"]
    return f"the {meta['size']} {meta['summary']} of sample {sample['key'][-3:]}, in the json"


def json_captioned(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Procedural samples whose json also holds a caption under :data:`FIELD`."""
    for sample in generate_samples(n, seed=seed):
        sample["json"][FIELD] = json_caption(sample)
        yield sample


def write_json_caption_shards(out: Path, n: int, per_shard: int) -> Path:
    """Shards (the repo's writer) of :func:`json_captioned` samples in ``out``."""
    write_shards(json_captioned(n), out, samples_per_shard=per_shard)
    return out


@pytest.fixture(scope="module")
def json_shards(tmp_path_factory) -> Path:
    return write_json_caption_shards(tmp_path_factory.mktemp("json_captions"), 24, 8)


def test_captions_come_from_the_json_key_as_the_training_stream_reads_them(json_shards):
    urls = shard_urls(str(json_shards), "training")
    source = caption_source(caption_field=FIELD)
    assert source == "json:caption" and caption_source("text") == "text"
    read = {key: caption for _, key, caption in shard_captions(urls, source)}
    members = {key: caption for _, key, caption in shard_captions(urls, "txt")}
    expected = {s["key"]: json_caption(s) for s in json_captioned(24)}
    assert read == expected and read.keys() == members.keys()
    assert all(read[key] != members[key] for key in read)
    fields = BatchFields(
        views=(ImageView("image", TrainTransform((32, 32), scale=(0.9, 1.0))),),
        texts=(TextField("text", lambda texts: texts, source=source),),
    )
    stream = make_train_stream(str(json_shards), StreamSettings(batch_size=8), fields=fields)
    batch = next(iter(stream))
    assert batch["text"] == [read[key] for key in batch["__key__"]]


def test_a_sample_without_the_key_is_named(tmp_path):
    samples = list(json_captioned(3))
    del samples[1]["json"][FIELD]
    write_shards(samples, tmp_path, samples_per_shard=8)
    (url,) = shard_urls(str(tmp_path), "training")
    with pytest.raises(SampleError, match=f"{url} sample 000000001: no json key 'caption'$"):
        list(shard_captions([url], "json:caption"))
    with pytest.raises(SampleError, match="sample 000000000: no member 'text'$"):
        list(shard_captions([url], "text"))
