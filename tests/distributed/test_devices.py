"""Every tensor handed to a collective lives on the device of the group's backend.

accelerate starts DDP with an NCCL-only process group, which refuses CPU tensors ("No backend
type associated with device type cpu"); a flag made with ``torch.tensor([...])`` crashed the first
multi-GPU step. Without a GPU we play NCCL on 2 gloo ranks: the backend reports "nccl", a tensor
moved to ``cuda`` becomes a CPU tensor that *says* it is on ``cuda:0`` (gloo still moves its
bytes), and every ``torch.distributed`` collective refuses a tensor that does not say so — as NCCL
does. Then a trainer step (stop/NaN flags, the feature check, the ring of the contrastive loss
and its backward, the logged means) must run and give the values of an honest run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.ddp_helpers import run_on_ranks

_CUDA = torch.device("cuda", 0)


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports ``cuda:0`` (what ``.to("cuda")`` gives under the fake)."""

    @property  # type: ignore[override]
    def device(self) -> torch.device:
        return _CUDA

    @property  # type: ignore[override]
    def is_cuda(self) -> bool:
        return True


def _target(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args[:1], kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            return torch.device(value)
    return None


def _fake_to(self: torch.Tensor, real_to: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    target = _target(args, kwargs)
    if target is None or target.type not in {"cuda", "cpu"}:
        return real_to(self, *args, **kwargs)
    plain = self.as_subclass(torch.Tensor) if isinstance(self, _FakeCuda) else self
    rest = args[1:] if args and isinstance(args[0], (str, torch.device)) else args
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    moved = real_to(plain, *rest, **kwargs) if rest or kwargs else plain
    on_cuda = isinstance(self, _FakeCuda)
    if (target.type == "cuda") == on_cuda:  # no move: .to returns the same tensor
        return self if moved is plain else (moved.as_subclass(_FakeCuda) if on_cuda else moved)
    copy = moved.clone()
    return copy.as_subclass(_FakeCuda) if target.type == "cuda" else copy


def _tensors(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dist.P2POp):
        return [value.tensor]
    return []


def _nccl_only(real: Any, name: str) -> Any:
    @functools.wraps(real)
    def call(*args: Any, **kwargs: Any) -> Any:
        for tensor in _tensors([*args, *kwargs.values()]):
            if tensor.device.type != "cuda":
                raise RuntimeError(
                    f"{name}: No backend type associated with device type {tensor.device.type}"
                )
        return real(*args, **kwargs)

    return call


def _play_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.Tensor, "to", functools.partialmethod(_fake_to, torch.Tensor.to))
    for name in ("all_reduce", "all_gather", "batch_isend_irecv", "broadcast"):
        monkeypatch.setattr(dist, name, _nccl_only(getattr(dist, name), name))


def _trainer_step(rank: int, world: int, out_dir: str, nccl: bool) -> dict[str, Any]:
    from vlp.config import Config
    from vlp.models import create_model
    from vlp.objectives import create_objective
    from vlp.training import Trainer, create_accelerator

    torch.manual_seed(0)
    model, _, _, tokenizer = create_model("vlp-tiny-vit")
    config = Config()
    config.train.out_dir = f"{out_dir}/rank{rank}"
    Path(config.train.out_dir).mkdir(parents=True)
    trainer = Trainer(
        config, model, create_objective("clip"), (),
        accelerator=create_accelerator(config.train.out_dir, log_with=None), model_info={},
    )  # fmt: skip
    torch.manual_seed(1 + rank)
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": tokenizer(["a red star", "a blue ring", "a cross", "a heart"]),
    }
    with pytest.MonkeyPatch.context() as monkeypatch:
        if nccl:
            _play_nccl(monkeypatch)
        parts, stop = trainer.train_step(batch, stop_requested=rank == 1)
        assert parts is not None
        logged = trainer._log(parts, samples_per_s=1.0)
    scale = trainer.accelerator.unwrap_model(trainer.model).logit_scale.detach().clone()
    return {"stop": stop, "loss": logged["train/loss"], "scale": scale}


@pytest.mark.slow
def test_a_trainer_step_sends_only_tensors_on_the_backends_device(tmp_path):
    """Under the NCCL play, the same losses and parameters as an honest gloo run."""
    faked = run_on_ranks(_trainer_step, 2, str(tmp_path / "nccl"), True)
    honest = run_on_ranks(_trainer_step, 2, str(tmp_path / "gloo"), False)
    for mine, real in zip(faked, honest, strict=True):
        assert mine["loss"] == pytest.approx(real["loss"], rel=1e-6)
        torch.testing.assert_close(mine["scale"], real["scale"])
        assert mine["stop"] and real["stop"]  # rank 1 asked to stop: every rank hears it


def _collectives(rank: int, world: int) -> dict[str, Any]:
    from vlp.distributed import collectives as c
    from vlp.distributed.checks import check_features

    with pytest.MonkeyPatch.context() as monkeypatch:
        _play_nccl(monkeypatch)
        assert c.collective_device() == _CUDA
        mine = torch.tensor([float(rank), 1.0])
        mean = c.all_reduce_mean(mine)
        summed = c.all_reduce_(mine.clone())
        gathered = c.all_gather(mine)
        (arrived,) = c.RingShift().start([mine])()
        columns = check_features(torch.ones(3, 4), torch.ones(3, 4), None)
    out = [mean, summed, *gathered, arrived]
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in out)
    return {"mean": mean, "sum": summed, "gathered": gathered, "arrived": arrived, "n": columns}


def test_collectives_move_to_the_backends_device_and_back():
    """Results come back on the caller's device, with the values of a plain gloo run."""
    for rank, result in enumerate(run_on_ranks(_collectives, 2)):
        torch.testing.assert_close(result["mean"], torch.tensor([0.5, 1.0]))
        torch.testing.assert_close(result["sum"], torch.tensor([1.0, 2.0]))
        torch.testing.assert_close(result["gathered"], [torch.tensor([0.0, 1.0]), torch.ones(2)])
        torch.testing.assert_close(result["arrived"], torch.tensor([float(1 - rank), 1.0]))
        assert result["n"] == 6


@pytest.mark.parametrize(
    ("backend", "device"),
    [("gloo", "cpu"), ("nccl", "cuda:0"), ("cpu:gloo,cuda:nccl", "cpu"), ("mpi", "cpu")],
)
def test_collective_device_follows_the_backend(monkeypatch, backend, device):
    from vlp.distributed.collectives import collective_device

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device() == torch.device(device)
