"""What `accelerate launch --config_file launch/accelerate/<name>.yaml` would start, and the
process group vlp would open in each launched process.

Each shipped config goes through accelerate's own launcher (``launch_command_parser`` ->
``launch_command``: its validation, its choice of launcher, ``prepare_multi_gpu_env`` /
``prepare_simple_launcher_cmd_env`` and torchrun's ``config_from_args``); only the final process
start is intercepted. Then, in the environment the first launched process would get, vlp's
``create_accelerator`` runs the real ``Accelerator`` -> ``PartialState`` start-up on a machine
without CUDA (``cpu_*``) or with CUDA faked (``gpu_*``, ``fsdp_*``) until the call that opens the
process group, which is intercepted and records the backend.

Checked here, without a GPU: the launcher (python or torchrun), nodes x processes per node, the
precision and FSDP flags handed to the processes, the distributed type and process-group backend
accelerate picks for vlp's ``Accelerator`` (gloo on the CPU; nccl on GPUs; ``cuda:nccl,cpu:gloo``
for FSDP with full state dicts), the precision vlp asks for, and that the FSDP plugin built from
the launcher's environment finds the layer class it must wrap in vlp's model.

Only a GPU run can check: that NCCL initialises and ranks meet (rendezvous), device placement,
the FSDP wrapping and sharding itself (``fully_shard``), bf16 autocast and its numerics, and the
multi-node rendezvous at ``main_process_ip``. ``gpu_1.yaml`` opens no process group, so on a GPU
machine only its launcher side is checked here.

Note: ``use_cpu`` reaches the processes only through accelerate's simple launcher
(``ACCELERATE_USE_CPU``); under torchrun (``cpu_2proc.yaml``) the ranks are gloo because vlp
builds ``Accelerator(cpu=True)`` when there is no CUDA, so on a GPU machine they would be nccl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed.run as torchrun
from accelerate.commands import launch as accelerate_launch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils import launch as launch_utils
from torch.distributed.fsdp import CPUOffloadPolicy

from vlp.training import accel

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launch" / "accelerate"
SCRIPT = str(ROOT / "launch" / "pretrain.py")


@dataclass(frozen=True)
class Expected:
    """What a launch with one config does: the launcher's side, then the first process's."""

    launcher: str
    """``python`` (accelerate's simple launcher: one process) or ``torchrun``."""
    nodes: int
    per_node: int
    precision: str
    """``ACCELERATE_MIXED_PRECISION`` handed to the processes."""
    fsdp: bool
    cuda: bool
    """The machine the config is for: CUDA available (faked here) or not."""
    distributed: DistributedType
    """accelerate's ``PartialState`` type in the process (FSDP is a layer on top of it)."""
    backend: str | None
    """The ``init_process_group`` backend (None: no process group)."""
    vlp_precision: str
    """The ``mixed_precision`` vlp's ``create_accelerator`` passes to ``Accelerator``."""


_CPU = {"precision": "no", "fsdp": False, "cuda": False, "vlp_precision": "no"}
_GPU = {"precision": "bf16", "cuda": True, "vlp_precision": "bf16"}
EXPECTED = {
    "cpu_1proc.yaml": Expected(
        launcher="python", nodes=1, per_node=1, **_CPU,
        distributed=DistributedType.NO, backend=None,
    ),
    "cpu_2proc.yaml": Expected(
        launcher="torchrun", nodes=1, per_node=2, **_CPU,
        distributed=DistributedType.MULTI_CPU, backend="gloo",
    ),
    "gpu_1.yaml": Expected(
        launcher="python", nodes=1, per_node=1, fsdp=False, **_GPU,
        distributed=DistributedType.NO, backend=None,
    ),
    "gpu_8_ddp.yaml": Expected(
        launcher="torchrun", nodes=1, per_node=8, fsdp=False, **_GPU,
        distributed=DistributedType.MULTI_GPU, backend="nccl",
    ),
    "gpu_2x8_ddp.yaml": Expected(
        launcher="torchrun", nodes=2, per_node=8, fsdp=False, **_GPU,
        distributed=DistributedType.MULTI_GPU, backend="nccl",
    ),
    # FULL_STATE_DICT gathers the state dict on the CPU: accelerate adds a gloo backend for it.
    "fsdp_8.yaml": Expected(
        launcher="torchrun", nodes=1, per_node=8, fsdp=True, **_GPU,
        distributed=DistributedType.MULTI_GPU, backend="cuda:nccl,cpu:gloo",
    ),
}  # fmt: skip


@dataclass
class Launch:
    """What accelerate's launcher would start: the processes of this node and their env."""

    launcher: str
    nodes: int
    per_node: int
    node_rank: int
    env: dict[str, str]
    """The environment the launched processes inherit (before torchrun's per-rank vars)."""
    command: list[str]
    master: str | None = None

    def first_process_env(self) -> dict[str, str]:
        """The environment of this node's first process (torchrun adds the rank variables)."""
        if self.launcher == "python":
            return dict(self.env)
        world = self.nodes * self.per_node
        addr, _, port = (self.master or "127.0.0.1:29500").rpartition(":")
        return {
            **self.env,
            "RANK": str(self.node_rank * self.per_node),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(self.per_node),
            "MASTER_ADDR": addr,
            "MASTER_PORT": port,
        }


def launch_config(name: str, monkeypatch: pytest.MonkeyPatch) -> Launch:
    """Run ``accelerate launch --config_file <name> launch/pretrain.py`` up to the process start."""
    started: list[Launch] = []

    def start_torchrun(args: Any) -> None:  # torch.distributed.run.run, as the launcher calls it
        config, entrypoint, script_args = torchrun.config_from_args(args)
        assert config.min_nodes == config.max_nodes, "elastic node counts are not expected"
        started.append(
            Launch(
                "torchrun", config.max_nodes, config.nproc_per_node,
                int(config.rdzv_configs.get("rank", 0)), dict(os.environ),
                [entrypoint, *script_args], config.rdzv_endpoint,
            )
        )  # fmt: skip

    def popen(command: list[str], env: dict[str, str]) -> Any:  # the simple launcher's Popen
        started.append(Launch("python", 1, 1, 0, dict(env), list(command)))
        return SimpleNamespace(wait=lambda: 0, returncode=0)

    monkeypatch.setattr(torchrun, "run", start_torchrun)
    monkeypatch.setattr(
        accelerate_launch,
        "subprocess",
        SimpleNamespace(Popen=popen, CalledProcessError=subprocess.CalledProcessError),
    )
    # A port already taken on the test machine would switch torchrun to a random port.
    monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port: False)
    # Set, so that accelerate does not size the thread count from this machine's cores.
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        args = accelerate_launch.launch_command_parser().parse_args(
            ["--config_file", str(CONFIGS / name), SCRIPT, "--config", "x.yaml"]
        )
        accelerate_launch.launch_command(args)
    assert len(started) == 1, f"{name}: the launcher started {len(started)} times"
    return started[0]


class _ProcessGroupOpened(Exception):
    """Raised in place of ``torch.distributed.init_process_group``: no rendezvous here."""

    def __init__(self, backend: str | None) -> None:
        super().__init__(backend)
        self.backend = backend


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide singletons, emptied for the test and restored after it."""
    saved = [
        (cls, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)
    ]
    for cls, _ in saved:
        cls._shared_state.clear()
    yield
    for cls, state in saved:
        cls._shared_state.clear()
        cls._shared_state.update(state)


@dataclass
class ProcessStart:
    """What vlp's first launched process set up before its process group would open."""

    accelerator_kwargs: dict[str, Any]
    distributed: DistributedType
    backend: str | None


def start_process(
    env: dict[str, str], cuda: bool, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> ProcessStart:
    """vlp's ``create_accelerator`` in ``env``, up to (not into) ``init_process_group``."""
    requested: dict[str, Any] = {}
    real_accelerator = accel.Accelerator

    def accelerator(**kwargs: Any) -> Any:
        requested.update(kwargs)
        return real_accelerator(**kwargs)

    def init_process_group(backend: str | None = None, **kwargs: Any) -> None:
        raise _ProcessGroupOpened(backend)

    monkeypatch.setattr(accel, "Accelerator", accelerator)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            accel.create_accelerator(out_dir, log_with=None)
            backend = None
        except _ProcessGroupOpened as opened:
            backend = opened.backend
    return ProcessStart(requested, PartialState._shared_state["distributed_type"], backend)


def test_every_shipped_config_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_starts_the_expected_processes(name, monkeypatch):
    expected = EXPECTED[name]
    started = launch_config(name, monkeypatch)
    assert (started.launcher, started.nodes, started.per_node) == (
        expected.launcher, expected.nodes, expected.per_node,
    )  # fmt: skip
    assert started.command[-3:] == [SCRIPT, "--config", "x.yaml"]
    if started.launcher == "python":
        assert started.command[0] == sys.executable
    env = started.env
    assert env["ACCELERATE_MIXED_PRECISION"] == expected.precision
    assert env.get("ACCELERATE_USE_FSDP", "false") == str(expected.fsdp).lower()
    if started.launcher == "python":
        # the simple launcher is the only one that hands `use_cpu` to the process
        assert env["ACCELERATE_USE_CPU"] == str(not expected.cuda)
    if name == "gpu_1.yaml":
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
    if name == "gpu_2x8_ddp.yaml":
        assert started.node_rank == 0 and started.master == "10.0.0.1:29500"


# gpu_1 opens no process group and its Accelerator needs a real GPU (see the module docstring).
@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"gpu_1.yaml"}))
def test_first_process_opens_the_expected_process_group(
    name, monkeypatch, tmp_path, fresh_accelerate_state
):
    expected = EXPECTED[name]
    started = launch_config(name, monkeypatch)
    process = start_process(started.first_process_env(), expected.cuda, tmp_path, monkeypatch)
    assert process.accelerator_kwargs["cpu"] is not expected.cuda
    assert process.accelerator_kwargs["mixed_precision"] == expected.vlp_precision
    assert process.distributed == expected.distributed
    assert process.backend == expected.backend


@pytest.mark.parametrize("name", ["gpu_8_ddp.yaml", "fsdp_8.yaml"])
def test_gpu_configs_fall_back_to_fp32_gloo_without_cuda(
    name, monkeypatch, tmp_path, fresh_accelerate_state, caplog
):
    """The GPU configs on a CPU-only machine: vlp asks for fp32 and accelerate uses gloo."""
    started = launch_config(name, monkeypatch)
    process = start_process(started.first_process_env(), False, tmp_path, monkeypatch)
    assert process.accelerator_kwargs["cpu"] is True
    assert process.accelerator_kwargs["mixed_precision"] == "no"
    assert "mixed_precision=bf16 was asked for on a CPU run" in caplog.text
    assert (process.distributed, process.backend) == (DistributedType.MULTI_CPU, "gloo")


def test_fsdp_plugin_wraps_every_residual_block_of_vlp_models(monkeypatch):
    from vlp.models import create_model

    started = launch_config("fsdp_8.yaml", monkeypatch)
    with mock.patch.dict(os.environ, started.env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # parameters stay on the GPU
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    model = create_model("vlp-tiny-vit")[0]
    plugin.set_auto_wrap_policy(model)  # raises if the class name is not in the model
    wrapped = [
        m for m in model.modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)
    ]
    assert len(wrapped) == 8  # 4 vision + 4 text residual attention blocks
    assert {type(m).__name__ for m in wrapped} == {"ResidualAttentionBlock"}
