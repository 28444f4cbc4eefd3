"""Hostile input: files a user downloads or is sent must not run code, write outside their
folder, exhaust memory, or leak credentials. Each test plants the attack and checks that vlp
refuses it with a clear error and that the attack's side effect did not happen."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def _plant_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    assert b"marker" in path.read_bytes() or marker.name.encode() in path.read_bytes()
    return path


def test_a_weights_file_holding_a_code_payload_is_refused_not_run(tmp_path: Path) -> None:
    from evals.loading import ModelLoadError, load_model

    marker = tmp_path / "pwned"
    for name in ("model.pt", "pytorch_model.bin"):
        weights = _plant_pickle(tmp_path / name, marker)
        with pytest.raises((ModelLoadError, ValueError)) as refused:
            load_model("vlp-tiny-vit", pretrained=str(weights))
        assert str(weights) in str(refused.value) or "weights" in str(refused.value)
        assert not marker.exists(), f"unpickling {name} ran its payload"


def test_a_checkpoint_or_export_with_a_pickle_instead_of_safetensors_is_refused(
    tmp_path: Path,
) -> None:
    from evals.loading import ModelLoadError, load_model
    from vlp.models import model_config

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    info = {"model_name": "vlp-tiny-vit", "model_cfg": model_config("vlp-tiny-vit")}
    (checkpoint / "model_config.json").write_text(json.dumps(info))
    _plant_pickle(checkpoint / "model.safetensors", marker)  # a pickle under the expected name
    export = tmp_path / "export"
    export.mkdir()
    config = {"model_cfg": info["model_cfg"], "preprocess_cfg": {}}
    (export / "open_clip_config.json").write_text(json.dumps(config))
    _plant_pickle(export / "open_clip_pytorch_model.bin", marker)
    for path in (checkpoint, tmp_path / "run", export):
        with pytest.raises((ModelLoadError, ValueError)):
            load_model(str(path))
        assert not marker.exists(), f"loading {path} ran a pickle payload"


def test_resume_from_a_checkpoint_holding_a_pickle_is_refused_not_run(tmp_path: Path) -> None:
    from vlp.training import checkpoint as ckpt

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    for name in ("optimizer", "rng_rank0"):
        _plant_pickle(checkpoint / f"{name}.pt", marker)
        _plant_pickle(checkpoint / f"{name}.bin", marker)
        with pytest.raises(Exception):  # noqa: B017 - any refusal, as long as nothing ran
            ckpt.load_state_parts(checkpoint, name)
        assert not marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "train:\n  out_dir: !!python/object/apply:os.system ['touch {marker}']\n",
        "!!python/object/apply:os.system ['touch {marker}']\n",
        "model: !!python/name:os.system\n",
        "data:\n  batch_size: !custom 3\n",
    ],
)
def test_yaml_configs_refuse_python_tags_with_one_line(tmp_path: Path, text: str) -> None:
    from vlp.config import ConfigError, load_config

    marker = tmp_path / "pwned"
    config = tmp_path / "config.yaml"
    config.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert "\n" not in str(refused.value) and str(config) in str(refused.value)
    with pytest.raises(ConfigError):
        load_config(None, [f"train.out_dir={text.splitlines()[-1].split(': ', 1)[-1]}"])
    assert not marker.exists()


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A 60-byte PNG that declares ``width`` x ``height`` pixels (a decompression bomb's head)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _stream(url: str, **kw: object):  # type: ignore[no-untyped-def]
    from torchvision import transforms

    from tests.data_pipelines.conftest import make_stream

    kw = {"batch_size": 2, "shuffle_buffer": 1, "resampled": False, "max_skip_fraction": 1, **kw}
    return make_stream(url, transforms.ToTensor(), **kw)


def test_shard_member_names_never_become_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data_pipelines.preview import first_samples, write_grid
    from data_pipelines.validate import validate_shards

    inside = tmp_path / "a" / "b"
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    shard = inside / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [
            ("000000000.jpg", _jpeg()), ("000000000.txt", b"ok"),
            ("../../evil.txt", b"pwned"), ("/tmp/evil_abs.txt", b"pwned"),
            ("../../000000001.jpg", _jpeg()), ("../../000000001.txt", b"x"),
        ]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = {p for p in tmp_path.rglob("*")}
    list(zip(range(2), _stream(str(shard), resampled=True), strict=False))
    validate_shards(str(shard))
    write_grid(first_samples(str(shard)), tmp_path / "grid.png")
    after = {p for p in tmp_path.rglob("*")} - {tmp_path / "grid.png"}
    assert after == before
    assert not Path("/tmp/evil_abs.txt").exists()


def test_a_10_mb_caption_and_a_100k_by_100k_image_are_skipped_and_counted(tmp_path: Path) -> None:
    import resource

    from tests.data_pipelines.conftest import write_tar

    good = {"jpg": _jpeg(), "txt": b"a green square"}
    url = write_tar(
        tmp_path / "00000.tar",
        [
            ("000000000", good), ("000000001", {"jpg": _jpeg(), "txt": b"x" * 10_000_000}),
            ("000000002", {"png": _png_header(100_000, 100_000), "txt": b"a bomb"}),
            ("000000003", good), ("000000004", good),
        ],
    )  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stream = _stream(url, resampled=True, shards_in_flight=1)  # read the shard in order
    keys = [k for _, b in zip(range(3), stream, strict=False) for k in b["__key__"]]
    assert "000000001" not in keys and "000000002" not in keys
    reasons = " ".join(stream.skips.reasons.values())
    assert stream.skips.by_shard[url] >= 2 and "caption" in reasons
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mb < 500  # 100k x 100k RGB would be 30 GB


@pytest.mark.slow
def test_credentials_in_shard_urls_never_reach_logs_config_or_provenance(tmp_path: Path) -> None:
    from data_pipelines.synthetic import generate_samples
    from data_pipelines.write import write_shards
    from launch.run import train
    from tests.data_pipelines.http_server import serve
    from tests.faults.test_bad_data import _config

    write_shards(generate_samples(20, seed=0), tmp_path / "shards", samples_per_shard=10)
    out = tmp_path / "run"
    with serve(tmp_path / "shards") as base:
        urls = f"{base}/{{00000..00001}}.tar?token=s3cr3t-token"
        train(_config(urls, out, **{"train.steps": 2}))
    for name in ("train.log", "config.yaml", "provenance.json", "metrics.jsonl"):
        assert "s3cr3t" not in (out / name).read_text(), f"the token leaks into {name}"
