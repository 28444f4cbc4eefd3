"""StableAdamW: AdamW with AdaFactor-style update clipping (Wortsman et al. 2023, "Stable and
low-precision training for large-scale vision-language models", arXiv 2304.13013, Algorithm 2).

CLIP's loss spikes follow steps where AdamW's second moment underestimates the squared gradient
(a rare large gradient after a quiet stretch): the update g/√v̂ is then far above 1 in every
coordinate. StableAdamW measures that per tensor, RMS_t = √mean(g_t² / max(v̂_t, ε²)) with v̂_t
the bias-corrected second moment (including g_t), and divides the tensor's learning rate by
max(1, RMS_t / d), d = 1 (the paper's default). The moments, their bias correction, ε and the
decoupled weight decay are AdamW's, so when no tensor clips the step IS torch's AdamW step, and
the state (``step``, ``exp_avg``, ``exp_avg_sq``) is AdamW's: checkpoints move between the two.

As in the authors' code, the weight decay uses the scheduled lr (unclipped); the paper uses
StableAdamW instead of gradient clipping (set ``optim.grad_clip: null``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

UPDATE_CLIP = 1.0
"""d, the RMS above which the lr is scaled down (the paper's default; AdaFactor's too)."""


@torch.no_grad()
def stable_adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    clip: float = UPDATE_CLIP,
) -> torch.Tensor:
    """One StableAdamW step of one tensor, in place on ``param`` and its fp32 moments (not bias
    corrected; ``step`` counts this step, from 1, as torch's AdamW does). Returns RMS_t (a
    0-dim tensor on the parameter's device); the lr was divided by max(1, RMS_t / clip).

    The operations are those of torch's single-tensor AdamW, in its order, so that an unclipped
    step equals it bit for bit.
    """
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    second_moment = (exp_avg_sq / bias_correction2).clamp_(min=eps**2)
    rms = grad.square().div_(second_moment).mean().sqrt()
    # 1 / max(1, RMS / d) stays a tensor: no wait on the device per tensor; × 1.0 is exact
    shrink = (rms / clip).clamp_(min=1.0).reciprocal_()
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg * shrink, denom, value=-lr / bias_correction1)
    return rms


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping (see the module docstring); AdamW's arguments and
    state, plus ``clip`` (d)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clip: float = UPDATE_CLIP,
    ):
        if clip <= 0:
            raise ValueError(f"StableAdamW: clip must be > 0, got {clip}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.clip = clip

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:  # AdamW's layout: a float step count and two fp32 moments
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                state["step"] += 1
                stable_adamw_update(
                    param, param.grad, state["exp_avg"], state["exp_avg_sq"],
                    state["step"].item(), lr=group["lr"], betas=group["betas"],
                    eps=group["eps"], weight_decay=group["weight_decay"], clip=self.clip,
                )  # fmt: skip
        return loss
