"""The stream with BatchFields: named views, text fields with sentence choice, JSON fields;
exact resume, and the fingerprint (unchanged for one plain image and caption)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision import transforms

from data_pipelines.batch_fields import BatchFields, ImageView, JsonField, TextField
from data_pipelines.sentences import split_sentences
from data_pipelines.stream import TrainStream
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

from .conftest import fake_tokenizer, make_stream
from .test_stream_resume import _take

WIDTH = 64
SENTENCES = [
    "The lungs are clear.",
    "No pleural effusion or pneumothorax.",
    "Heart size is normal.",
    "Dr. Smith reviewed image No. 3.",
    "There is a 1.5 cm nodule in the RUL.",
    "Mild degenerative changes, e.g. osteophytes.",
    "Stable.",  # one word: never drawn with min_words=3
    "Unchanged.",
]


def text_codes(texts: list[str]) -> torch.Tensor:
    """An injective stand-in tokenizer: the characters, padded to WIDTH (a test reads them back)."""
    out = torch.zeros(len(texts), WIDTH, dtype=torch.long)
    for i, t in enumerate(texts):
        assert len(t) <= WIDTH, t
        out[i, : len(t)] = torch.tensor([ord(c) for c in t])
    return out


def decode_codes(row: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in row if c)


def _meta(index: int) -> dict[str, Any]:
    """The json of sample ``index``: 0-3 boxes, 1-2 tags, a 3-5 sentence report."""
    n_boxes = index % 4
    boxes = [[round(0.1 * j, 2), 0.2, round(0.1 * j + 0.3, 2), 0.9] for j in range(n_boxes)]
    report = " ".join(SENTENCES[(index + 2 * j) % len(SENTENCES)] for j in range(3 + index % 3))
    return {"boxes": boxes, "tags": ["shape", "colour"][: 1 + index % 2], "report": report}


def _write(
    out: Path, n: int = 48, per_shard: int = 8, meta: Callable[[int], dict[str, Any]] = _meta
) -> str:
    samples = []
    for index, sample in enumerate(generate_samples(n, seed=0)):
        samples.append({**sample, "json": meta(index)})
    write_shards(samples, out, samples_per_shard=per_shard)
    return str(out)


@pytest.fixture(scope="module")
def report_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six shards of 8 samples whose json carries boxes, tags and a report."""
    return _write(tmp_path_factory.mktemp("reports"))


def _crop(size: int, scale: tuple[float, float]) -> transforms.Compose:
    return transforms.Compose(
        [transforms.RandomResizedCrop(size, scale=scale), transforms.RandomHorizontalFlip(),
         transforms.PILToTensor()]
    )  # fmt: skip


def _fields(**kw: Any) -> BatchFields:
    kw.setdefault(
        "views",
        (ImageView("global", _crop(16, (0.5, 1.0)), "test-global"),
         ImageView("local", _crop(8, (0.1, 0.4)), "test-local")),
    )  # fmt: skip
    kw.setdefault(
        "texts",
        (TextField("caption", fake_tokenizer),
         TextField("report", text_codes, source="json:report", choose="sentence", min_words=3,
                   tokenizer_name="codes")),
    )  # fmt: skip
    kw.setdefault("json", (JsonField("boxes", "boxes"), JsonField("tags", "tags")))
    return BatchFields(**kw)


def _stream(urls: str, fields: BatchFields | None = None, **kw: Any) -> TrainStream:
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 10)
    return make_stream(urls, fields=_fields() if fields is None else fields, **kw)


def _assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y)
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("workers", [0, 2])
def test_two_views_two_texts_and_json_fields_in_every_batch(
    report_shards: str, workers: int
) -> None:
    for batch in _take(_stream(report_shards, workers=workers), 5):
        assert set(batch) == {"global", "local", "caption", "report", "boxes", "boxes_mask",
                              "tags", "tags_mask", "__key__"}  # fmt: skip
        assert batch["global"].shape == (4, 3, 16, 16) and batch["global"].dtype == torch.uint8
        assert batch["local"].shape == (4, 3, 8, 8) and batch["local"].dtype == torch.uint8
        longest = max(int(k) % 4 for k in batch["__key__"])
        assert batch["boxes"].shape == (4, longest, 4) and batch["boxes_mask"].shape == (4, longest)
        for i, key in enumerate(batch["__key__"]):
            meta = _meta(int(key))
            n = len(meta["boxes"])
            assert batch["boxes_mask"][i].tolist() == [True] * n + [False] * (longest - n)
            expected = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(n, 4)
            assert torch.equal(batch["boxes"][i, :n], expected)
            assert batch["tags"][i][: len(meta["tags"])] == meta["tags"]
            assert batch["tags_mask"][i].sum() == len(meta["tags"])
            sentence = decode_codes(batch["report"][i])
            assert sentence in split_sentences(meta["report"]) and len(sentence.split()) >= 3
        assert batch["caption"].shape == (4, 8)


def test_view_zero_keeps_todays_seed_and_other_views_draw_their_own(report_shards: str) -> None:
    augment = _crop(16, (0.1, 1.0))
    fields = BatchFields(
        views=(ImageView("image", augment), ImageView("again", augment)),
        texts=(TextField("text", fake_tokenizer),),
    )
    new = _take(_stream(report_shards, fields, seed=3), 4)
    old = _take(make_stream(report_shards, augment, batch_size=4, shuffle_buffer=10, seed=3), 4)
    for a, b in zip(new, old, strict=True):
        assert a["__key__"] == b["__key__"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["text"], b["text"])
    assert not all(torch.equal(b["image"], b["again"]) for b in new)


def _reference_fingerprint(spec: Any) -> str:
    """The fingerprint as it was before batch fields: every spec field but these four (and the
    two that came with canonical streams, at their values of a run with one micro-batch, and
    the view salt of ProtoCLIP's fresh pass-2 views, 0 outside them)."""
    assert spec.accum_steps == 1 and spec.phases == spec.workers and spec.view_salt == 0
    ignored = {"rank", "max_consecutive_errors", "remote_timeout", "remote_retries", "fields"}
    ignored |= {"accum_steps", "phases", "view_salt"}
    parts = {k: v for k, v in spec.__dict__.items() if k not in ignored}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def test_one_plain_image_and_caption_keep_the_fingerprint_from_before_fields(
    report_shards: str,
) -> None:
    """Every CLIP run's positions carry this fingerprint: the caption's source stands for the
    fields, so positions saved by today's runs (and by those before batch fields) load."""
    for source, text_key, caption_field, options in (
        ("txt", "txt", None, {}),
        ("json:report", "txt", "report", {}),
        ("txt", "txt", None, {"resampled": False, "seed": 3}),
        ("cls", "cls", None, {}),
    ):
        stream = make_stream(report_shards, _crop(8, (0.5, 1)), source=source, batch_size=4,
                             **options)  # fmt: skip
        assert stream.spec.fields == ()
        assert (stream.spec.text_key, stream.spec.caption_field) == (text_key, caption_field)
        assert stream.spec.fingerprint() == _reference_fingerprint(stream.spec)
        assert "fields" not in stream.state_dict()
    with_fields = _stream(report_shards)
    assert with_fields.spec.fields == _fields().fingerprint_parts()
    assert with_fields.spec.fingerprint() != _reference_fingerprint(with_fields.spec)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(
    "workers,resampled,stop",
    [(0, True, 3), (0, False, 7),
     pytest.param(2, False, 5, marks=pytest.mark.slow),
     pytest.param(2, True, 4, marks=pytest.mark.slow)],
)  # fmt: skip
def test_resume_with_fields_is_exact(
    report_shards: str, seed: int, workers: int, resampled: bool, stop: int
) -> None:
    """Epoch mode has 12 batches per epoch here (48 samples, batch 4): stops inside the first
    epoch, with prefetched batches the interrupted run never consumed."""
    total = 16
    options: dict[str, Any] = {"workers": workers, "resampled": resampled, "seed": seed,
                               "prefetch_factor": 3}  # fmt: skip
    uninterrupted = _take(_stream(report_shards, **options), total)
    first = _stream(report_shards, **options)
    head = _take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["fields"] == [list(p) for p in _fields().fingerprint_parts()]
    second = _stream(report_shards, **options)
    second.load_state_dict(state)
    _assert_same(head + _take(second, total - stop), uninterrupted)


def _sentences_by_epoch(batches: list[dict[str, Any]]) -> list[dict[str, str]]:
    """{key: chosen report sentence}, one dict per epoch of 12 batches."""
    epochs: list[dict[str, str]] = []
    for n, batch in enumerate(batches):
        if n % 12 == 0:
            epochs.append({})
        for key, row in zip(batch["__key__"], batch["report"], strict=True):
            epochs[-1][key] = decode_codes(row)
    return epochs


@pytest.mark.parametrize("seed", [0, 5])
def test_sentences_are_drawn_anew_each_epoch_and_the_same_after_a_resume(
    report_shards: str, seed: int
) -> None:
    options: dict[str, Any] = {"resampled": False, "seed": seed, "workers": 0}
    batches = _take(_stream(report_shards, **options), 36)  # three epochs
    epochs = _sentences_by_epoch(batches)
    assert len(epochs) == 3 and all(len(e) == 48 for e in epochs)
    for later in epochs[1:]:  # 2-4 sentences to draw from: about half the draws differ
        changed = sum(epochs[0][k] != later[k] for k in epochs[0])
        assert 10 <= changed <= 40
    for epoch in epochs:  # and every sentence of at least 3 words gets drawn
        for key, sentence in epoch.items():
            assert sentence in split_sentences(_meta(int(key))["report"])
    drawn = {s for e in epochs for s in e.values()}
    assert drawn == {s for s in SENTENCES if len(s.split()) >= 3}
    first = _stream(report_shards, **options)
    _take(first, 17)  # inside the second epoch
    second = _stream(report_shards, **options)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert _sentences_by_epoch(_take(first, 19)) == _sentences_by_epoch(_take(second, 19))


def test_a_sample_without_a_usable_sentence_or_json_key_is_a_counted_skip(tmp_path: Path) -> None:
    def meta(index: int) -> dict[str, Any]:
        if index == 3:
            return {**_meta(index), "report": "Stable. Unchanged."}  # no 3-word sentence
        if index == 9:
            return {"report": _meta(index)["report"], "tags": []}  # no boxes
        return _meta(index)

    shards = _write(tmp_path, n=16, per_shard=8, meta=meta)
    stream = _stream(shards, resampled=False, shuffle_buffer=1)
    keys = [k for b in _take(stream, 3) for k in b["__key__"]]
    assert "000000003" not in keys and "000000009" not in keys
    assert stream.skips.total == 2
    first, second = f"{shards}/00000.tar", f"{shards}/00001.tar"
    assert stream.skips.by_shard == {first: 1, second: 1}
    assert "sample 000000003" in stream.skips.reasons[first]
    assert "no sentence of at least 3 words" in stream.skips.reasons[first]
    assert "sample 000000009" in stream.skips.reasons[second]
    assert "json key 'boxes'" in stream.skips.reasons[second]


def test_clashing_keys_are_refused(report_shards: str) -> None:
    with pytest.raises(ValueError, match=r"extra_keys \['boxes_mask'\] clash"):
        _stream(report_shards, extra_keys=("boxes_mask",))
    with pytest.raises(ValueError, match="'report' is used by text field 'report' and json"):
        _fields(json=(JsonField("report", "report"),))
    extra = next(iter(_stream(report_shards, extra_keys=("cls", "json"))))
    assert extra["cls"].shape == (4,) and [m["key"] for m in extra["json"]] == extra["__key__"]


def test_resume_with_other_fields_is_refused_naming_them(report_shards: str) -> None:
    stream = _stream(report_shards)
    _take(stream, 2)
    state = stream.state_dict()
    preset = _fields(views=(ImageView("global", _crop(16, (0.5, 1.0)), "convirt"),
                            ImageView("local", _crop(8, (0.1, 0.4)), "test-local")))  # fmt: skip
    whole = _fields(texts=(TextField("caption", fake_tokenizer),
                           TextField("report", text_codes, source="json:report",
                                     tokenizer_name="codes")))  # fmt: skip
    fewer = _fields(json=(JsonField("boxes", "boxes"),))
    for other in (preset, whole, fewer):
        with pytest.raises(ValueError, match=r"batch fields \[view global test-global; .*\], "
                                             r"this run reads \[.*\].*same objective and fields"):  # fmt: skip
            _stream(report_shards, other).load_state_dict(state)
    single = make_stream(report_shards, _crop(8, (0.5, 1)), batch_size=4, shuffle_buffer=10)
    with pytest.raises(ValueError, match=r"this run reads \[view 'image', text 'text'"):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch fields \[view 'image', text 'text'"):
        _stream(report_shards).load_state_dict(single.state_dict())
    same = _stream(report_shards)
    same.load_state_dict(state)
    assert same.state_dict() == state
