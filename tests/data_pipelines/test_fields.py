"""Start-up checks: a stream's BatchFields against the shards' first samples, and a sidecar
against every training sample (from sizes.json where it can)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from data_pipelines.batch_fields import BatchFields, ImageView, JsonField, TextField
from data_pipelines.fields import MissingField, first_sample_fields, missing_batch_fields
from data_pipelines.sidecar import Sidecar, shard_name
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

from .conftest import fake_tokenizer, preprocess, write_tar


def _fields(*texts: TextField, json: tuple[JsonField, ...] = ()) -> BatchFields:
    views = (ImageView("global", preprocess()), ImageView("local", preprocess()))
    return BatchFields(views=views, texts=texts, json=json)


def _shards(out: Path, meta: dict[str, Any]) -> list[str]:
    samples = [{**s, "json": meta} for s in generate_samples(6, seed=0)]
    return write_shards(samples, out, samples_per_shard=3)


def test_nothing_is_missing_when_the_shards_carry_every_field(tmp_path: Path) -> None:
    urls = _shards(tmp_path, {"summary": "red star", "boxes": [[0, 0, 1, 1]]})
    fields = _fields(
        TextField("caption", fake_tokenizer),
        TextField("summary", fake_tokenizer, source="json:summary"),
        json=(JsonField("boxes", "boxes"),),
    )
    assert missing_batch_fields(urls, fields, shards=2) == []


def test_missing_json_keys_and_members_are_named_with_the_shard(tmp_path: Path) -> None:
    urls = _shards(tmp_path, {"report": "The lungs are clear."})
    fields = _fields(
        TextField("summary", fake_tokenizer, source="json:summary"),
        TextField("short", fake_tokenizer, source="summary.txt"),
        TextField("report", fake_tokenizer, source="json:report", choose="sentence"),
        json=(JsonField("boxes", "boxes"),),
    )
    missing = missing_batch_fields(urls, fields, shards=2)
    assert missing == [
        MissingField("summary", "json key 'summary'", urls[0]),
        MissingField("short", "member 'summary.txt'", urls[0]),
        MissingField("boxes", "json key 'boxes'", urls[0]),
        MissingField("summary", "json key 'summary'", urls[1]),
        MissingField("short", "member 'summary.txt'", urls[1]),
        MissingField("boxes", "json key 'boxes'", urls[1]),
    ]
    assert str(missing[0]) == f"field 'summary' (json key 'summary') is missing in shard {urls[0]}"
    assert [m.shard for m in missing_batch_fields(urls, fields)] == [urls[0]] * 3  # shards=1


def test_a_shard_without_images_or_json_names_each_view_and_key(tmp_path: Path) -> None:
    url = write_tar(tmp_path / "00000.tar", [("a", {"txt": b"a caption"})])
    fields = _fields(TextField("caption", fake_tokenizer), json=(JsonField("boxes", "boxes"),))
    missing = missing_batch_fields([url], fields)
    assert [(m.field, m.source) for m in missing] == [
        ("global", "image member, one of jpg, jpeg, png, webp"),
        ("local", "image member, one of jpg, jpeg, png, webp"),
        ("boxes", "json key 'boxes'"),
    ]
    assert missing_batch_fields([url], fields, image_keys=("txt",))[0].field == "boxes"


def test_unreadable_shards_or_bad_json_raise_naming_them(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar file at all" * 40)
    fields = _fields(TextField("caption", fake_tokenizer))
    with pytest.raises(ValueError, match="bad.tar"):
        missing_batch_fields([str(bad)], fields)
    bad_json = write_tar(tmp_path / "j.tar", [("k", {"jpg": b"x", "json": b"{nope"})])
    with pytest.raises(ValueError, match="sample k: bad json"):
        missing_batch_fields([bad_json], _fields(json=(JsonField("b", "b"),)))


def test_first_sample_fields_still_merges_members_and_json_keys(tmp_path: Path) -> None:
    urls = _shards(tmp_path, {"summary": "red star"})
    assert {"jpg", "txt", "json", "cls", "summary", "key", "image"} <= first_sample_fields(urls[0])


def _sidecar_of(urls: list[str], path: Path, *, drop: tuple[str, ...] = (), record=None) -> str:
    """A sidecar with an entry for every sample of ``urls`` but ``drop``, recording the shards
    (``record``: url -> count; default: each shard's true count)."""
    import torch
    import webdataset as wds

    from data_pipelines.sidecar import write_sidecar
    from data_pipelines.tario import iter_keys

    keys = {}
    for url in urls:
        with wds.gopen(url) as stream:
            keys[url] = list(iter_keys(stream))
    rows = {k: torch.zeros(1) for url in urls for k in keys[url] if k not in drop}
    counts = {url: len(keys[url]) for url in urls} if record is None else record
    write_sidecar(path, rows, shards=counts)
    return str(path)


def _count_shard_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import webdataset as wds

    from data_pipelines import fields

    opened: list[str] = []
    real = wds.gopen
    monkeypatch.setattr(wds, "gopen", lambda url, *a, **k: opened.append(url) or real(url, *a, **k))
    keys = fields.iter_keys
    monkeypatch.setattr(fields, "iter_keys", lambda stream: opened.append("names") or keys(stream))
    return opened


def test_the_sidecar_check_reads_no_shard_when_sizes_json_agrees(tmp_path, monkeypatch) -> None:
    """The sidecar records each shard with the count sizes.json lists (its writer gave every
    sample it read an entry): no shard is opened, no member name read."""
    from data_pipelines.fields import sidecar_gaps

    urls = write_shards(generate_samples(20, seed=0), tmp_path / "shards", samples_per_shard=7)
    path = _sidecar_of(urls, tmp_path / "s.safetensors")
    opened = _count_shard_reads(monkeypatch)
    assert sidecar_gaps(urls, path) == (0, 20, "")
    assert opened == []


def test_the_sidecar_check_reads_the_names_of_the_shards_it_cannot_vouch_for(
    tmp_path, monkeypatch
) -> None:
    """Shard 1 recorded with another count (rewritten since), shard 2 not recorded: only
    those two shards' member names are read, once, and their missing keys counted."""
    from data_pipelines.fields import sidecar_gaps

    urls = write_shards(generate_samples(21, seed=0), tmp_path / "shards", samples_per_shard=7)
    record = {urls[0]: 7, urls[1]: 6}
    drop = ("000000008", "000000015", "000000016")  # shard 1, shard 2, shard 2
    path = _sidecar_of(urls, tmp_path / "s.safetensors", drop=drop, record=record)
    opened = _count_shard_reads(monkeypatch)
    assert sidecar_gaps(urls, path) == (3, 21, f"'000000008' in shard {urls[1]}")
    assert opened == [urls[1], "names", urls[2], "names"]
    (tmp_path / "shards" / "sizes.json").unlink()  # no sizes.json: every shard is read
    opened.clear()
    assert sidecar_gaps(urls, path).missing == 3
    assert [u for u in opened if u != "names"] == urls


def test_the_sidecar_check_reads_a_sidecar_rebuilt_in_this_process_anew(tmp_path) -> None:
    """The start-up check names a command that rebuilds the sidecar in place, and a process may
    run it and check again (``tests/launch/test_prior_sidecar.py``). Before: the check read the
    file through the per-process cache of open sidecars, so it saw the old keys, and read the
    new file's shard records at the old file's offsets (garbage names, UnicodeDecodeError)."""
    from data_pipelines.fields import sidecar_gaps

    urls = write_shards(generate_samples(21, seed=0), tmp_path / "shards", samples_per_shard=7)
    path = tmp_path / "s.safetensors"
    _sidecar_of(urls[:1], path)
    assert sidecar_gaps(urls, str(path)).missing == 14
    held = Sidecar(path)
    _sidecar_of(urls, path)  # rebuilt in place: another file under the same name
    assert sidecar_gaps(urls, str(path)) == (0, 21, "")
    assert held.shards() == {shard_name(urls[0]): 7}  # an open sidecar reads its own file
