"""Every shipped accelerate config loads with accelerate's own loader and says what it claims."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "accelerate"

EXPECTED = {
    "cpu_1proc.yaml": (DistributedType.NO, 1, 1, "no"),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1, "no"),
    "gpu_1.yaml": (DistributedType.NO, 1, 1, "bf16"),
    "gpu_8_ddp.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
    "gpu_2x8_ddp.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
    "fsdp_8.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
}


def test_every_shipped_config_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    config = load_config_from_file(str(CONFIGS / name))
    kind, processes, machines, precision = EXPECTED[name]
    assert config.distributed_type == kind
    assert config.num_processes == processes
    assert config.num_machines == machines
    assert config.mixed_precision == precision
    if name.startswith("cpu_"):
        assert config.use_cpu
