"""End to end: `launch/pretrain.py` alone and under `accelerate launch` with 2 gloo processes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "launch" / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(generate_samples(256, seed=0), out, samples_per_shard=64)
    return out


def _overrides(shards: Path, out: Path, **extra: object) -> list[str]:
    values = {
        "data.train_shards": shards,
        "data.batch_size": 8,
        "data.workers": 0,
        "data.shuffle_buffer": 16,
        "train.out_dir": out,
        "train.log_every": 1,
        "optim.warmup_steps": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accelerate(
    args: list[str],
    recipe: Path = DEMO,
    entry: Path = ROOT / "launch" / "pretrain.py",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``ENTRY --config RECIPE ARGS`` (``launch/pretrain.py``) on 2 gloo processes under
    accelerate, with ``env`` added to the environment."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "launch/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        str(entry), "--config", str(recipe), *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _train_on_rank(rank: int, world: int, argv: list[str]) -> tuple[int, str]:
    """``vlp ARGV`` on this rank; its exit status and the end of what it printed on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()[-3000:]


def _on_two_ranks(args: list[str], recipe: Path = DEMO) -> None:
    """``vlp train --config RECIPE ARGS`` on 2 gloo ranks, each with the variables torchrun
    gives it (as under ``accelerate launch``: one Accelerator over both, DDP), run in
    ``run_on_ranks``' kept processes: the run a launched one is, without a launcher and two new
    interpreters importing torch, open_clip and transformers per test (~10-15 s on 2 cores).
    The launcher itself is tested by the runs above and in test_rank_failures.py."""
    from tests.ddp_helpers import run_on_ranks

    argv = ["train", "--config", str(recipe), *args]
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}):
        ranks = run_on_ranks(_train_on_rank, 2, argv, timeout_s=300, torchrun_env=True)
    for rank, (code, err) in enumerate(ranks):
        assert code == 0, f"rank {rank} exited with {code}:\n{err}"


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


@pytest.mark.slowest
def test_two_process_run_then_resume(shards, tmp_path):
    out = tmp_path / "run"
    # on the kept gloo ranks: `accelerate launch` itself runs in test_kill_resume.py and
    # test_rank_failures.py
    _on_two_ranks(
        _overrides(
            shards,
            out,
            **{"train.steps": 3, "train.checkpoint_every": 2, "train.keep_checkpoints": 2},
        )
    )
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["world_size"] == 2
    assert provenance["global_batch"] == 16
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000003"]
    state = _state(out / "checkpoints" / "step_00000003")
    assert state["world_size"] == 2 and state["samples_seen"] == 48
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors", "model.safetensors"} <= {
        p.name for p in (out / "checkpoints" / "step_00000003").iterdir()
    }

    _on_two_ranks(_overrides(shards, out, **{"train.steps": 5, "train.resume": "latest"}))
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "at step 3" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # the resumed schedule follows the new train.steps=5 (cosine over 5 steps, not stuck at 0)
    assert records[3]["train/lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert _state(out / "checkpoints" / "step_00000005")["step"] == 5
    assert (out / "config.yaml").is_file() and (out / "plots" / "loss_curve.png").is_file()
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_two_processes_accumulating_in_groups_of_one(shards, tmp_path, objective):
    """accelerate + DDP + GradCache (accelerator.no_sync) + contrastive groups, end to end."""
    out = tmp_path / "run"
    extra = {"train.steps": 2, "train.accum_steps": 2, "train.group_size": 1}
    _on_two_ranks(_overrides(shards, out, **extra, **{"objective.name": objective}))
    assert json.loads((out / "provenance.json").read_text())["global_batch"] == 2 * 2 * 8
    assert (
        "2 micro-batches x batch 8 = global batch 32 (contrastive groups of 1 rank)"
        in (out / "train.log").read_text()
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in records)
    model_cfg = json.loads(
        (out / "checkpoints" / "step_00000002" / "model_config.json").read_text()
    )
    assert ("init_logit_bias" in json.dumps(model_cfg)) == (objective == "siglip")


@pytest.fixture(scope="module")
def flat_shards(tmp_path_factory) -> Path:
    """Four shards of 4 samples whose images are flat colours, one colour per sample.

    The training crop is seeded per (canonical stream, sample count), so the streams of a
    2-process run crop the same samples differently from a 1-process run's one stream; every
    crop of a flat image is the same image, which makes the batches of the runs identical pixel
    for pixel.
    """
    out = tmp_path_factory.mktemp("flat_shards")

    def flat(sample: dict) -> dict:
        colour = np.random.default_rng(int(sample["key"])).integers(0, 256, 3)
        return {**sample, "image": Image.new("RGB", sample["image"].size, tuple(map(int, colour)))}

    write_shards(
        map(flat, generate_samples(16, seed=1)), out, samples_per_shard=4, image_format="png"
    )
    return out


def _exact_overrides(shards: Path, out: Path, **extra: object) -> list[str]:
    """Epoch mode without shuffling or interleaving: epoch 0's shard order is dealt to the
    canonical streams, so the first step of 2 processes (x 1 or 2 micro-batches) holds the 16
    samples a 1-process run reads first, shard by shard (in another order)."""
    return _overrides(
        shards, out, **{"data.resampled": False, "data.shuffle_buffer": 1,
                        "data.shards_in_flight": 1, "train.steps": 1},
        **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_process_first_loss(flat_shards, tmp_path_factory) -> float:
    """Step 1's loss of one process on the 16-sample batch (same seed, so the same init)."""
    from launch.run import check
    from vlp.config import load_config

    out = tmp_path_factory.mktemp("one_process")
    config = load_config(DEMO, _exact_overrides(flat_shards, out, **{"data.batch_size": 16}))
    loss = check(config).first_step_loss
    assert loss is not None and math.isfinite(loss)
    return loss


@pytest.mark.slow
def test_two_ranks_read_the_halves_of_the_one_process_batch(flat_shards):
    """The premise of the loss comparison below: the same samples, pixels and tokens (in
    another order: the loss over a batch does not depend on it)."""
    from data_pipelines.batch_fields import BatchFields
    from data_pipelines.stream import make_train_stream
    from data_pipelines.stream_settings import StreamSettings
    from data_pipelines.transforms import fast_transforms_for_model
    from launch.build import build_model
    from vlp.config import load_config

    config = load_config(DEMO, _exact_overrides(flat_shards, Path("unused")))
    model, _, _, tokenizer, _ = build_model(config)
    fast = fast_transforms_for_model(model)
    draft_size = fast.draft_size
    fields = BatchFields.single(fast.train, tokenizer)

    def first_batches(batch_size: int, rank: int, world_size: int, count: int) -> list[dict]:
        settings = StreamSettings(
            batch_size=batch_size, draft_size=draft_size, resampled=False, shuffle_buffer=1,
            shards_in_flight=1, seed=config.train.seed, accum_steps=count,
        )  # fmt: skip
        stream = make_train_stream(
            str(flat_shards), settings, fields=fields, rank=rank, world_size=world_size
        )
        batches = iter(stream)
        return [next(batches) for _ in range(count)]

    def by_key(batches: list[dict]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        keys = [k for b in batches for k in b["__key__"]]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        image, text = (torch.cat([b[name] for b in batches])[order] for name in ("image", "text"))
        return sorted(keys), image, text

    (whole,) = first_batches(16, 0, 1, 1)
    keys, image, text = by_key([whole])
    for batch_size, accum in ((8, 1), (4, 2)):
        parts = [b for rank in (0, 1) for b in first_batches(batch_size, rank, 2, accum)]
        part_keys, part_image, part_text = by_key(parts)
        assert part_keys == keys
        assert torch.equal(part_image, image) and torch.equal(part_text, text)
    assert len(set(whole["__key__"])) == 16
    assert len({tuple(image[:, 0, 0].tolist()) for image in whole["image"]}) == 16


@pytest.mark.slow
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_two_process_loss_equals_the_one_process_loss_on_the_joined_batch(
    flat_shards, one_process_first_loss, tmp_path, accum_steps
):
    """Two gloo ranks, one contrastive group (the default): the logged step-1 loss (the mean of
    the ranks' losses) is the loss of one process on both ranks' samples, also when each rank
    accumulates 2 micro-batches (GradCache). Every process seeds (``train.seed``) before it
    builds the model, so both runs start from the same weights. Local negatives only, a group
    per rank or a 1/N slip in the mean would each move it far beyond the tolerance."""
    out = tmp_path / "run"
    extra = {"data.batch_size": 8 // accum_steps, "train.accum_steps": accum_steps}
    _on_two_ranks(_exact_overrides(flat_shards, out, **extra))
    assert "global batch 16 (contrastive groups of 2 ranks)" in (out / "train.log").read_text()
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1
    assert record["train/loss"] == pytest.approx(one_process_first_loss, rel=1e-5, abs=0)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 75), (signal.SIGUSR1, 75)])
def test_sigterm_leaves_a_complete_checkpoint(shards, tmp_path, signum, status):
    """A preemption notice (SIGTERM, or SIGUSR1 as SLURM's --signal sends it), sent to the
    whole process group (data workers included) as schedulers do: a checkpoint within a step,
    then exit status 75 (EX_TEMPFAIL) for the scheduler to requeue. Ctrl-C (130), then a resume
    that ends where an uninterrupted run does: ``tests/faults/test_kill_resume.py``."""
    out = tmp_path / "run"
    extra = {"train.steps": 100_000, "train.checkpoint_every": 0, "data.workers": 1}
    command = [
        sys.executable, str(ROOT / "launch/pretrain.py"), "--config", str(DEMO),
        *_overrides(shards, out, **extra),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else ""
        time.sleep(0.5)
    os.killpg(process.pid, signum)  # the process and its data worker, as a terminal does
    assert process.wait(timeout=120) == status, process.stderr.read()[-3000:]
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and checkpoints[0].name.startswith("step_")
    assert _state(checkpoints[0])["step"] >= 1 and (checkpoints[0] / "COMPLETE").is_file()
    assert signal.Signals(signum).name in (out / "train.log").read_text()


def test_a_run_that_fails_at_start_up_leaves_its_folder_as_it_found_it(tmp_path, capsys):
    """No empty train.log or lock file in the user's folder, and no folder it did not have."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", kept):
        args = _overrides(tmp_path / "no_such_shards", out)
        assert main(["train", "--config", str(DEMO), *args]) == 2
        assert "training shards not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_folder_stops_naming_it(shards, tmp_path, capsys):
    """Two trainings into one train.out_dir at once would interleave their metrics and
    overwrite each other's checkpoints: the second stops at start-up, naming the first."""
    out = tmp_path / "run"
    args = _overrides(shards, out, **{"train.steps": 100_000, "train.checkpoint_every": 0})
    command = [sys.executable, str(ROOT / "launch/pretrain.py"), "--config", str(DEMO), *args]
    first = subprocess.Popen(command, cwd=ROOT, env=_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
            assert first.poll() is None
            time.sleep(0.5)
        logged = (out / "metrics.jsonl").read_text()
        assert main(["train", "--config", str(DEMO), *args]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"train.out_dir='{out}' is in use by another training run (host " in error
        assert f"pid {first.pid})" in error
        assert (out / "metrics.jsonl").read_text().startswith(logged)  # nothing of the second
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 75


def test_check_runs_one_step_and_prints_the_plan(shards, tmp_path, capsys, caplog):
    out = tmp_path / "planned"
    with caplog.at_level(logging.INFO):
        warmup = {"optim.warmup_steps": 50}
        code = main(["train", "--check", "--config", str(DEMO), *_overrides(shards, out, **warmup)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "global batch:   8" in printed and "samples seen:   4800" in printed
    assert str(out) in printed
    assert not out.exists()  # a check writes nothing into the run directory
    # The warnings and the plan are about the user's 600 steps, not the check's one step.
    assert "training 1 step from step 0" in caplog.text, caplog.text
    assert "is more than train.steps" not in caplog.text


CONVIRT = (
    "objective.name=convirt model.name=convirt-tiny-vit-bert objective.convirt.frozen_text_layers=1"
)


def test_an_hf_text_tower_that_does_not_load_is_one_line(shards, tmp_path, capsys):
    config = json.loads((ROOT / "vlp/models/model_configs/convirt-tiny-vit-bert.json").read_text())
    config["text_cfg"] |= {"hf_model_name": "/no/such/bert", "hf_tokenizer_name": "/no/such/bert"}
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(config))
    args = ["train", "--check", "--config", str(DEMO), *_overrides(shards, tmp_path / "run")]
    assert main([*args, f"model.name={model_file}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "/no/such/bert" in error[0], error


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train_shards=/no/such/folder", "training shards not found"),
        ("model.name=ViT-Q-99", "unknown model 'ViT-Q-99'"),
        ("objective.name=clipp", "unknown objective 'clipp'"),
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("train.accum_steps=0", "accum_steps"),
        ("train.group_size=2", "train.group_size=2 must be a positive divisor of the world size 1"),
        ("train.report_to=[tensorbored]", "train.report_to: unknown tracker 'tensorbored'"),
        ("objective.clip.smothing=0.1", "'objective.clip.smothing'; did you mean 'smoothing'"),
        (f"{CONVIRT} objective.convirt.augment=convrit", "did you mean 'convirt'"),
        (
            f"{CONVIRT} objective.convirt.text_source=json:abstract",
            "field 'text' (json key 'abstract') is missing in shard",
        ),
        (
            f"{CONVIRT} objective.convirt.text_source=json:abstract",
            "; objective.convirt.text_source=txt trains on the captions (txt) instead",
        ),
        (  # every summary is 2 words: no sentence of 3 -> every sample skipped
            f"{CONVIRT} objective.convirt.text_source=json:summary",
            "consecutive samples or shards failed",
        ),
    ],
)
def test_bad_input_stops_with_one_clear_line(shards, tmp_path, capsys, override, message):
    args = ["train", "--check", "--config", str(DEMO), *_overrides(shards, tmp_path)]
    args += override.split(" ")
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    # one error line, the last; a problem found once training began follows its log lines
    assert not any("Traceback" in line for line in error), error
    assert [line for line in error if line.startswith("vlp: error")] == error[-1:], error
    assert message in error[-1] and error[-1].startswith("vlp: error: "), error


def test_missing_sample_fields_are_named(shards, tmp_path):
    from data_pipelines.batch_fields import BatchFields, ImageView, JsonField, TextField
    from launch.build import StartupError
    from launch.sidecar_checks import check_data
    from vlp.config import load_config

    config = load_config(DEMO, _overrides(shards, tmp_path))
    fields = BatchFields(
        views=(ImageView("image", lambda image: image),),
        texts=(TextField("text", lambda texts: texts),),
        json=(JsonField("boxes", "boxes"),),
    )
    shard = r".*/00000\.tar"
    with pytest.raises(
        StartupError, match=rf": field 'boxes' \(json key 'boxes'\) is missing in shard {shard}"
    ):
        check_data(config, fields)
