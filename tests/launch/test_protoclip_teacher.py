"""`vlp protoclip teacher`: one PCA-reduced teacher embedding per sample key, in the sidecar
format the stream reads, the same from 1 and 2 processes; bad data named at start-up."""

from __future__ import annotations

import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.batch_fields import BatchFields, ImageView, SidecarField
from data_pipelines.sidecar import Sidecar, write_sidecar
from data_pipelines.stream import make_train_stream
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.synthetic import generate_samples
from data_pipelines.transforms import TrainTransform
from data_pipelines.write import write_shards
from launch.build import StartupError
from launch.protoclip_teacher import (
    DEFAULT_NAME,
    DEFAULT_POOL,
    DEFAULT_TEACHER,
    METADATA_KEYS,
    Moments,
    Pca,
    default_out,
    embed_captions,
    fit_pca,
    load_teacher,
    write_teacher_sidecar,
)
from tests.data_pipelines.conftest import write_tar
from tests.launch.test_pretrain import ROOT, _env, _free_port

SAMPLES, DIM = 48, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three shards of 16 samples (keys 000000000..000000047)."""
    out = tmp_path_factory.mktemp("teacher_shards")
    write_shards(generate_samples(SAMPLES, seed=0), out, samples_per_shard=16)
    return out


@pytest.fixture(scope="module")
def sidecar(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    assert write_teacher_sidecar(str(shards), out, dim=DIM, batch_size=16) == out
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sidecar = Sidecar(path)
    return dict(sidecar.items()), sidecar.metadata


def _assert_same_values(a: Path, b: Path, atol: float) -> None:
    (first, _), (second, _) = _read(a), _read(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=atol)


def test_every_key_gets_a_dim_vector_and_the_metadata(sidecar) -> None:
    tensors, metadata = _read(sidecar)
    assert sorted(tensors) == [f"{i:09d}" for i in range(SAMPLES)]
    assert all(t.shape == (DIM,) and t.dtype == torch.float32 for t in tensors.values())
    assert set(metadata) == set(METADATA_KEYS)
    assert len(metadata["id"]) == 32 and metadata["model"] == "vlp:all-minilm-l6-v2"
    assert (metadata["dim"], metadata["width"], metadata["samples"]) == ("8", "384", "48")
    assert metadata["text_key"] == "txt" and 0 < float(metadata["explained_variance"]) <= 1
    assert metadata["pool"] == "all-positions"  # the official script's, by default


def test_default_pool_averages_all_77_positions_padded_with_id_0() -> None:
    """As the official script (megvii-research/protoclip ``src/utils/RoBERTa.py``): each
    caption's ids padded with 0 to 77, no attention mask, the mean over all 77 positions,
    L2-normalised. Reference: one caption at a time, padded by hand; a caption longer than
    77 tokens is truncated."""
    tokenizer, model = load_teacher("vlp:all-minilm-l6-v2")
    captions = ["a dog", "two red cars parked beside a small house", "word " * 100]
    expected = []
    with torch.no_grad():
        for caption in captions:
            ids = tokenizer(caption, truncation=True, max_length=77)["input_ids"]
            padded = torch.tensor([ids + [0] * (77 - len(ids))])
            hidden = model(input_ids=padded, attention_mask=torch.ones_like(padded))
            expected.append(torch.nn.functional.normalize(hidden.last_hidden_state.mean(1), dim=-1))
    got = embed_captions(captions, tokenizer, model, batch_size=2)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=0)
    tokens_only = embed_captions(captions, tokenizer, model, batch_size=2, pool="tokens")
    assert (got - tokens_only).norm(dim=-1).min() > 1e-2  # the setting changes the features


def test_pca_output_is_centred_with_decreasing_variance(sidecar) -> None:
    values = torch.stack(list(_read(sidecar)[0].values())).double()
    torch.testing.assert_close(
        values.mean(0), torch.zeros(DIM, dtype=torch.float64), atol=1e-6, rtol=0
    )
    variances = values.var(0)
    assert (variances[:-1] > variances[1:]).all(), variances
    covariance = torch.cov(values.T)  # principal coordinates are uncorrelated
    torch.testing.assert_close(covariance, torch.diag(variances), atol=1e-5, rtol=0)


def test_a_rerun_gives_the_same_values_under_another_id(sidecar, shards, tmp_path) -> None:
    again = write_teacher_sidecar(
        str(shards), tmp_path / "again.safetensors", dim=DIM, batch_size=5
    )
    _assert_same_values(sidecar, again, atol=1e-5)  # other batches: other padding, same values
    assert _read(sidecar)[1]["id"] != _read(again)[1]["id"]
    assert (
        SidecarField("teacher", str(sidecar)).fingerprint()
        != SidecarField("teacher", str(again)).fingerprint()
    )


def test_the_stream_reads_it_as_batch_teacher(sidecar, shards) -> None:
    fields = BatchFields(
        views=(ImageView("image", TrainTransform((32, 32), scale=(0.9, 1.0))),),
        sidecars=(SidecarField("teacher", str(sidecar)),),
    )
    settings = StreamSettings(batch_size=8, shuffle_buffer=1)
    batch = next(iter(make_train_stream(str(shards), settings, fields=fields)))
    tensors = _read(sidecar)[0]
    assert batch["teacher"].shape == (8, DIM)
    torch.testing.assert_close(
        batch["teacher"], torch.stack([tensors[k] for k in batch["__key__"]])
    )


@pytest.mark.parametrize(
    ("n", "width", "dim", "chunk", "offset"),
    [(50, 6, 3, 7, 0.0), (9, 20, 8, 4, 0.0), (300, 32, 32, 1000, 0.0), (200, 16, 5, 7, 30.0)],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_fit_pca_matches_an_svd_reference(n, width, dim, chunk, offset, streamed) -> None:
    """Reference: the SVD of the centred data, each direction's largest entry made positive;
    the same from the whole tensor and from an iterator of its chunks (far from the origin too:
    the chunks' moments are merged, not accumulated raw)."""
    features = torch.randn(n, width, generator=torch.Generator().manual_seed(n)) * torch.linspace(
        3, 1, width
    )
    features = features + offset
    pca = fit_pca(iter(features.split(chunk)) if streamed else features, dim, chunk=chunk)
    x = features.double().numpy()
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:dim] * np.sign(vt[:dim][np.arange(dim), np.abs(vt[:dim]).argmax(1)])[:, None]
    np.testing.assert_allclose(pca.components.numpy(), vt.T, atol=1e-9)
    np.testing.assert_allclose(pca.variances.numpy(), s[:dim] ** 2 / (n - 1), rtol=1e-9)
    np.testing.assert_allclose(
        pca.project(features, chunk=chunk).numpy(), centred @ vt.T, atol=1e-5
    )


def test_fit_pca_keeps_no_chunk_of_a_stream() -> None:
    """Peak memory independent of n: when a chunk is drawn, every chunk before the previous
    one (still the loop's variable) is gone, so nothing [n, w] is ever built; and the result
    equals that of the whole tensor."""
    generator = torch.Generator().manual_seed(0)
    whole = torch.randn(400, 6, generator=generator) * torch.linspace(2, 1, 6)
    alive: list[weakref.ref] = []

    def chunks():
        for rows in whole.split(10):
            assert all(ref() is None for ref in alive[:-1]), "an earlier chunk is still held"
            chunk = rows.clone()
            alive.append(weakref.ref(chunk))
            yield chunk
            del chunk

    streamed, reference = fit_pca(chunks(), 3), fit_pca(whole, 3)
    assert len(alive) == 40
    torch.testing.assert_close(streamed.components, reference.components, rtol=0, atol=1e-10)
    torch.testing.assert_close(streamed.mean, reference.mean, rtol=0, atol=1e-12)


def test_the_main_process_never_holds_all_the_features(shards, tmp_path, monkeypatch) -> None:
    """48 samples, batches of 16: the moments take one batch at a time, the projection one
    shard at a time; nothing of all 48 rows reaches the PCA."""
    added, projected = [], []
    add, project = Moments.add, Pca.project
    monkeypatch.setattr(
        Moments, "add", lambda self, rows: added.append(len(rows)) or add(self, rows)
    )
    monkeypatch.setattr(
        Pca,
        "project",
        lambda self, rows, **k: projected.append(len(rows)) or project(self, rows, **k),
    )
    out = write_teacher_sidecar(str(shards), tmp_path / "t.safetensors", dim=DIM, batch_size=16)
    assert added == [16, 16, 16] and projected == [16, 16, 16]
    assert Sidecar(out).shards() == {str(p): 16 for p in sorted(shards.glob("*.tar"))}


def test_fit_pca_refuses_a_dim_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match=r"dim must be in \[1, 4\]"):
        fit_pca(torch.randn(10, 4), 5)
    with pytest.raises(ValueError, match="needs more than 4 samples"):
        fit_pca(torch.randn(4, 16), 4)


def test_a_key_seen_twice_names_both_shards(shards, tmp_path) -> None:
    copy = tmp_path / "copy"
    write_shards(generate_samples(16, seed=1), copy, samples_per_shard=16)  # keys 0..15 again
    with pytest.raises(
        StartupError, match=r"copy/00000.tar sample 000000000: .* after shard .*/00000.tar"
    ):
        write_teacher_sidecar(f"{shards}::{copy}", tmp_path / "t.safetensors", dim=DIM)


def test_a_sample_without_text_names_its_shard_and_key(tmp_path) -> None:
    shard = write_tar(tmp_path / "00000.tar", [("a", {"txt": b"a cat"}), ("b", {"jpg": b"x"})])
    with pytest.raises(StartupError, match=r"00000.tar sample b: no member 'txt'"):
        write_teacher_sidecar(shard, tmp_path / "t.safetensors", dim=1)


def test_dims_above_the_width_or_the_samples_are_refused(shards, tmp_path) -> None:
    out = tmp_path / "t.safetensors"
    with pytest.raises(StartupError, match=r"--dim must be in \[1, 384\]"):
        write_teacher_sidecar(str(shards), out, dim=385)
    with pytest.raises(StartupError, match="needs more than 48 samples"):
        write_teacher_sidecar(str(shards), out, dim=SAMPLES)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporaries left


def test_the_default_output_sits_beside_local_shards_only() -> None:
    assert default_out(["/data/a/00000.tar", "/b/1.tar"]) == Path("/data/a") / DEFAULT_NAME
    assert default_out(["file:///data/a/00000.tar"]) == Path("/data/a") / DEFAULT_NAME
    for remote in ("s3://bucket/00000.tar", "pipe:curl -s http://host/00000.tar"):
        with pytest.raises(StartupError, match="give --out"):
            default_out([remote])


def test_cli_writes_beside_the_shards_and_reports_errors(shards, sidecar, tmp_path, capsys) -> None:
    from launch.cli import main

    folder = tmp_path / "shards"
    folder.mkdir()
    for tar in sorted(shards.glob("*.tar")):
        (folder / tar.name).symlink_to(tar)
    assert main(["protoclip", "teacher", str(folder), "--dim", str(DIM), "--batch-size", "32"]) == 0
    written = folder / DEFAULT_NAME
    assert f"of {SAMPLES} samples to {written}" in capsys.readouterr().out
    _assert_same_values(written, sidecar, atol=1e-5)
    assert main(["protoclip", "teacher", str(folder), "--dim", "400"]) == 2
    assert capsys.readouterr().err.startswith("vlp: error: --dim must be in [1, 384]")
    assert main(["protoclip", "teacher", str(folder), "--model", str(tmp_path / "none")]) == 2
    assert "does not load as a transformers text model" in capsys.readouterr().err


class _Rank:
    """An accelerate-like state of one of ``world`` threads (threads stand in for processes:
    the rank protocol, files and barriers, is what is under test)."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes = rank, world
        self.is_main_process, self.device = rank == 0, torch.device("cpu")
        self.barrier = barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait()


def _on_ranks(world: int, *args, **kwargs) -> list[object]:
    """``write_teacher_sidecar`` on ``world`` thread ranks: each rank's result or exception."""
    barrier, results = threading.Barrier(world, timeout=120), [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = write_teacher_sidecar(
                *args, accelerator=_Rank(rank, world, barrier), **kwargs
            )
        except Exception as error:  # noqa: BLE001 - the test compares them
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_ranks_split_the_shards_and_all_raise_one_rank_s_error(shards, sidecar, tmp_path) -> None:
    out = tmp_path / "ranks" / "t.safetensors"
    assert _on_ranks(2, str(shards), out, dim=DIM) == [out, out]
    _assert_same_values(out, sidecar, atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.safetensors"]  # no temporaries

    bad = write_tar(tmp_path / "00001.tar", [("z", {"json": b"{}"})])  # rank 1's only shard
    results = _on_ranks(2, f"{shards}/00000.tar::{bad}", out, dim=1)
    assert all(
        isinstance(r, StartupError) and "00001.tar sample z: no member 'txt'" in str(r)
        for r in results
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.safetensors"]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(shards, sidecar, tmp_path) -> None:
    out = tmp_path / "two.safetensors"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "launch/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        "-m", "launch.cli", "protoclip", "teacher", str(shards), "--out", str(out),
        "--dim", str(DIM),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote the teacher embeddings of 48 samples") == 1
    _assert_same_values(out, sidecar, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.safetensors"]


def _check(shards, sidecar, *overrides):
    """The start-up data check of a ProtoCLIP run on ``shards`` reading ``sidecar``."""
    from data_pipelines.batch_fields import TextField
    from launch.sidecar_checks import check_data
    from vlp.config import load_config
    from vlp.objectives.protoclip.objective import TEACHER, ProtoClipObjective

    config = load_config(None, [f"data.train_shards={shards}", "objective.name=clip", *overrides])
    fields = BatchFields(views=(ImageView("image", lambda image: image),),
                         texts=(TextField("text", lambda texts: texts),),
                         sidecars=(SidecarField(TEACHER, str(sidecar)),))  # fmt: skip
    commands = ProtoClipObjective.sidecar_commands
    return check_data(config, fields, commands, tokenized_sidecars=(), tokenizer=object())


def test_a_teacher_of_another_caption_source_is_refused(sidecar, shards, tmp_path, caplog) -> None:
    assert _check(shards, sidecar)  # its own source; the teacher's tokenizer is not compared
    with pytest.raises(StartupError) as error:
        _check(shards, sidecar, "data.caption_field=caption")
    message = str(error.value)
    assert (
        "\n" not in message and "made from captions 'txt', the run reads 'json:caption'" in message
    )
    assert message.endswith(  # the teacher, width and pooling the file records
        f"rebuild it for this run with: vlp protoclip teacher {shards} --out {sidecar} "
        f"--model {DEFAULT_TEACHER} --dim {DIM} --pool {DEFAULT_POOL} --caption-field caption"
    )
    read = Sidecar(sidecar)
    old = tmp_path / "old.safetensors"
    metadata = {k: v for k, v in read.metadata.items() if k not in ("text_key", "vlp_sidecar")}
    write_sidecar(old, read.items(), metadata)
    with caplog.at_level("WARNING", logger="vlp"):
        assert _check(shards, old, "data.caption_field=caption")
    assert "records no text_key (written by an older vlp): it cannot be checked" in caplog.text


def test_json_captions_make_a_teacher_and_the_refusals_command_rebuilds_it(tmp_path) -> None:
    """``--caption-field`` embeds the captions of the samples' json, as ``data.caption_field``
    makes training read them (the same values as shards holding them as ``txt``), and records
    ``json:<key>``; the command the start-up check names for such a run writes a teacher that
    the run accepts, with the width and pooling of the file it replaces."""
    import shlex

    from launch.cli import main
    from tests.data_pipelines.test_captions import json_caption, json_captioned
    from tests.data_pipelines.test_captions import write_json_caption_shards as write

    shards = write(tmp_path / "json", 24, 8)
    sidecar = tmp_path / "teacher.safetensors"
    write_teacher_sidecar(str(shards), sidecar, dim=DIM, pool="tokens")  # from the txt members
    json_run = "data.caption_field=caption"
    with pytest.raises(StartupError) as error:
        _check(shards, sidecar, json_run)
    command = str(error.value).split("rebuild it for this run with: ")[1]
    recorded = f"--model {DEFAULT_TEACHER} --dim {DIM} --pool tokens"
    assert (
        command
        == f"vlp protoclip teacher {shards} --out {sidecar} {recorded} --caption-field caption"
    )  # noqa: E501
    assert main(shlex.split(command)[1:]) == 0
    metadata = _read(sidecar)[1]
    assert (metadata["text_key"], metadata["dim"], metadata["pool"]) == (
        "json:caption",
        str(DIM),
        "tokens",
    )  # noqa: E501
    assert _check(shards, sidecar, json_run)  # the rebuilt file is accepted
    with pytest.raises(StartupError, match="--pool tokens$"):  # a run reading txt: no option
        _check(shards, sidecar)
    as_members = tmp_path / "members"
    write_shards(({**s, "txt": json_caption(s)} for s in json_captioned(24)), as_members,
                 samples_per_shard=8)  # fmt: skip
    expected = write_teacher_sidecar(
        str(as_members), tmp_path / "expected.safetensors", dim=DIM, pool="tokens"
    )
    _assert_same_values(sidecar, expected, atol=1e-5)


def test_a_teacher_missing_samples_is_remade_with_its_recorded_settings(
    sidecar, shards, tmp_path
) -> None:
    """The command named for a teacher lacking samples carries the teacher model, width and
    pooling that file records, not the command's defaults."""
    read = Sidecar(sidecar)
    short = tmp_path / "short.safetensors"
    write_sidecar(short, list(read.items())[1:], read.metadata)
    with pytest.raises(StartupError) as error:
        _check(shards, short)
    message = str(error.value)
    assert f"1 of {SAMPLES} training samples have no entry in sidecar 'teacher'" in message
    assert message.endswith(
        f"make it for these shards with: vlp protoclip teacher {shards} --out {short} "
        f"--model {DEFAULT_TEACHER} --dim {DIM} --pool {DEFAULT_POOL}"
    ), message
