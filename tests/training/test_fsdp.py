"""FSDP2 (``fully_shard``) on 2 gloo CPU processes: whole checkpoints, resume, eval forward.

accelerate turns FSDP into plain DDP on a CPU-only machine, so these tests shard the model with
torch's ``fully_shard`` directly and drive the functions the trainer uses
(:mod:`vlp.training.model_state`); ``benchmarks/gpu_check.sh`` runs the trainer itself under
accelerate's FSDP on a GPU machine. Reference: the same model unsharded in the same process.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tests.ddp_helpers import run_on_ranks
from vlp.models import create_model
from vlp.training import checkpoint as ckpt
from vlp.training.model_state import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    make_scalars_shardable,
    register_forward_methods,
)

pytestmark = pytest.mark.slow


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, *_ = create_model("vlp-tiny-vit")
    return model.double()


def _shard(model: torch.nn.Module) -> list[str]:
    from open_clip.transformer import ResidualAttentionBlock
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    scalars = make_scalars_shardable(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_forward_methods(model)
    return scalars


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    seed: int,
    frozen: Iterable[torch.nn.Parameter] = (),
) -> torch.Tensor:
    """One CLIP step on a batch from ``seed``; its loss. The gradients of ``frozen`` are dropped
    before the optimizer's step, as ProtoCLIP's ``before_optimizer_step`` drops its heads' and a
    LiT episode's image tower's."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    texts = torch.randint(1, 400, (4, 32), generator=generator)
    out = model(image=images, text=texts)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(4)
    loss = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    loss.backward()
    for param in frozen:
        param.grad = None
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _save_load_resume(rank: int, world: int, directory: str) -> dict:
    """One step sharded and unsharded; save whole; load into a fresh sharded model; one more."""
    reference = _model(0)
    reference_opt = _optimizer(reference)
    sharded = copy.deepcopy(reference)
    scalars = _shard(sharded)
    sharded_opt = _optimizer(sharded)
    _step(reference, reference_opt, seed=1)  # every rank sees the same batch: same gradient
    _step(sharded, sharded_opt, seed=1)

    raw_local = sharded_opt.state_dict()["state"]  # what a rank-0-only save used to write
    model_state = full_model_state(sharded, scalars)
    optimizer_state = full_optimizer_state(sharded, sharded_opt, scalars)
    out: dict = {"scalars": scalars}
    if rank == 0:
        names = [name for name, _ in reference.named_parameters()]
        reference_moments = {
            names[i]: s["exp_avg"] for i, s in reference_opt.state_dict()["state"].items()
        }
        out["model_diff"] = max(
            (model_state[k] - v).abs().max().item() for k, v in reference.state_dict().items()
        )
        out["model_keys_equal"] = set(model_state) == set(reference.state_dict())
        out["scale_shape"] = list(model_state["logit_scale"].shape)
        out["moment_diff"] = max(
            (optimizer_state["state"][k]["exp_avg"] - v).abs().max().item()
            for k, v in reference_moments.items()
        )
        out["local_is_partial"] = any(
            s["exp_avg"].to_local().numel() < s["exp_avg"].numel() for s in raw_local.values()
        )
        save_file(model_state, str(Path(directory) / "model.safetensors"))
        ckpt.save_state_parts(Path(directory), "optimizer", optimizer_state)
    dist.barrier()

    resumed = _model(7)  # other initial weights: everything must come from the files
    resumed_scalars = _shard(resumed)
    resumed_opt = _optimizer(resumed)
    load_full_model_state(resumed, load_file(str(Path(directory) / "model.safetensors")), scalars)
    load_full_optimizer_state(
        resumed, resumed_opt, ckpt.load_state_parts(Path(directory), "optimizer"), resumed_scalars
    )
    _step(reference, reference_opt, seed=2)
    _step(resumed, resumed_opt, seed=2)
    after = full_model_state(resumed, resumed_scalars)

    resumed.eval()
    reference.eval()
    with torch.no_grad():  # an evaluator's call, on every rank
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
        out["encode_diff"] = (
            (resumed.encode_image(images) - reference.encode_image(images)).abs().max().item()
        )
    if rank == 0:
        out["resumed_diff"] = max(
            (after[k] - v).abs().max().item() for k, v in reference.state_dict().items()
        )
    return out


def test_fsdp_checkpoint_is_whole_and_resumes_exactly(tmp_path):
    results = run_on_ranks(_save_load_resume, 2, str(tmp_path))
    main = results[0]
    assert main["scalars"] == ["logit_scale"]
    # the fault: each rank's own optimizer state holds only its shard of the moments
    assert main["local_is_partial"]
    assert main["model_keys_equal"] and main["scale_shape"] == []  # open_clip's shapes on disk
    assert main["model_diff"] < 1e-12
    assert main["moment_diff"] < 1e-12
    assert main["resumed_diff"] < 1e-12  # weights AND moments came back: the next step agrees
    for result in results:  # every rank's eval forward gathered the whole model
        assert result["encode_diff"] < 1e-12


def test_scalars_become_shardable_and_keep_their_values():
    model = _model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = make_scalars_shardable(model)
    assert names == ["logit_scale"]
    assert model.logit_scale.shape == (1,) and model.logit_scale.requires_grad
    assert math.isclose(float(model.logit_scale), float(before["logit_scale"]))
    assert full_model_state(model, names)["logit_scale"].shape == ()


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_version_one_is_refused_with_the_setting_to_change(version):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from vlp.training.accel import check_sharding

    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)),
    )
    if version == 2:
        check_sharding(accelerator)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match="fsdp_version: 2"):
            check_sharding(accelerator)  # type: ignore[arg-type]
