"""AdamW with decay only on weight matrices, and a linear-warmup + cosine schedule.

Biases, norm gains and the logit scale/bias get no weight decay, the same rule as open_clip's
trainer (every parameter with fewer than 2 dimensions, or named ``bn``/``ln``/``bias``/``logit_``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlp.config import OptimConfig

_NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_")


def _decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim >= 2 and not any(part in name for part in _NO_DECAY_NAME_PARTS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and undecayed everything else (trainable only)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def create_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters with CLIP's decay exclusions."""
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
    )


class WarmupCosine:
    """The lr multiplier for step s: linear warmup to 1, then cosine decay to 0 at the end."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step with warmup + cosine."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, total_steps)
    )
