"""The optimizer (``optim.name``) with decay only on weight matrices, and a linear-warmup + cosine
schedule.

Biases, norm gains and the logit scale/bias get no weight decay, the same rule as open_clip's
trainer (every parameter with fewer than 2 dimensions, or named ``bn``/``ln``/``bias``/``logit_``).
``optim.name`` picks the update on these two groups: ``adamw`` (torch), ``stable_adamw``
(:mod:`vlp.training.stable_adamw`), ``adamw8bit`` and ``stable_adamw8bit``
(:mod:`vlp.training.adamw8bit`: 8-bit moments, except for the undecayed group and tensors under
4,096 elements, which keep fp32 ones). ``optim.fused`` puts torch's AdamW update into one fused
kernel (:func:`fused_choice`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlp.config import OptimConfig
from vlp.training.stable_adamw import StableAdamW

logger = logging.getLogger(__name__)

_NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_")


def _decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim >= 2 and not any(part in name for part in _NO_DECAY_NAME_PARTS)


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: set[str] | frozenset[str] = frozenset(),
    apart: set[str] | frozenset[str] = frozenset(),
) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and undecayed everything else (trainable only);
    names in ``exclude`` (an objective's :meth:`~vlp.objectives.Objective.no_decay`) never decay.
    Names in ``apart`` (a tower on an lr schedule of its own) get two more groups, the same
    split, marked ``apart: True`` (the others ``apart: False``); none: the two groups alone."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (a, d): [] for a in (False, True) for d in (True, False)
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = _decays(name, param) and name not in exclude
            groups[name in apart, decays].append(param)
    made = []
    for own in (False, True) if apart else (False,):
        for decays in (True, False):
            group = {"params": groups[own, decays], "weight_decay": weight_decay if decays else 0.0}
            made.append(group | ({"apart": own} if apart else {}))
    return made


def names_in(model: nn.Module, part: nn.Module) -> set[str]:
    """The names (as ``model.named_parameters()`` gives them) of the parameters of ``part``, a
    submodule of ``model``: for ``parameter_groups``' ``apart``."""
    own = {id(p) for p in part.parameters()}
    return {name for name, param in model.named_parameters() if id(param) in own}


EIGHT_BIT = ("adamw8bit", "stable_adamw8bit")
"""The ``optim.name`` values whose big tensors keep 8-bit moments (bitsandbytes' layout)."""


def fused_choice(config: OptimConfig, device: torch.device | str) -> tuple[bool, str]:
    """Whether torch's fused AdamW kernel runs the update on ``device``, and why.

    Without it torch updates each (device, dtype) group of tensors with several ``foreach``
    kernels per step; fused, one kernel reads gradient and moments once. ``auto`` takes it on
    CUDA only: torch's fused CPU kernel exists too, but the CPU runs are not where a kernel
    launch costs. Only ``optim.name=adamw`` has one (the config refuses ``true`` otherwise)."""
    choice = str(config.fused).lower()
    if config.name != "adamw":
        return False, f"optim.name={config.name} has no fused kernel"
    if choice == "false":
        return False, "optim.fused=false"
    if choice == "true":
        return True, "optim.fused=true"
    on_cuda = torch.device(device).type == "cuda"
    return on_cuda, f"optim.fused=auto on {torch.device(device).type}"


def create_optimizer(
    model: nn.Module,
    config: OptimConfig,
    exclude: set[str] | frozenset[str] = frozenset(),
    device: torch.device | str = "cpu",
    apart: set[str] | frozenset[str] = frozenset(),
) -> torch.optim.Optimizer:
    """``config.name``'s optimizer over the model's trainable parameters with CLIP's decay
    exclusions (and ``exclude``'s); with 8 bits, the undecayed groups keep fp32 moments.
    ``device`` is where the parameters will train (:func:`fused_choice`); the choice is logged.
    ``apart``: parameter names in groups of their own (:func:`parameter_groups`)."""
    groups = parameter_groups(model, config.weight_decay, exclude, apart)
    settings: dict[str, Any] = {
        "lr": config.lr, "betas": (config.beta1, config.beta2), "eps": config.eps,
    }  # fmt: skip
    fused, why = fused_choice(config, device)
    logger.info("optimizer %s, %s kernel (%s)", config.name, "fused" if fused else "unfused", why)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, **settings, fused=fused or None)
    if config.name == "stable_adamw":
        return StableAdamW(groups, **settings)
    from vlp.training import adamw8bit  # bitsandbytes (~3 s to import): only when asked for

    for group in groups[1::2]:  # the undecayed ones
        group["optim_bits"] = 32
    kind = adamw8bit.AdamW8bit if config.name == "adamw8bit" else adamw8bit.StableAdamW8bit
    return kind(groups, **settings, min_8bit_size=adamw8bit.MIN_8BIT_SIZE)


def convert_optimizer_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, saved: str, wanted: str
) -> dict[str, Any]:
    """A checkpoint's optimizer ``state`` (written with ``optim.name`` ``saved``) in the layout
    of ``optimizer`` (``optim.name`` ``wanted``): fp32 moments quantised to 8 bits or 8-bit ones
    dequantised, logged (INFO). AdamW and StableAdamW share a layout, as do their 8-bit forms.

    A converted state takes ``optimizer``'s group settings (the config's, as after any resume:
    :func:`keep_config_settings`), since the other optimizer's have other keys.
    """
    if (saved in EIGHT_BIT) == (wanted in EIGHT_BIT):
        if saved != wanted:
            logger.info("resume: optim.name %s → %s, the checkpoint's moments kept", saved, wanted)
        return state
    from vlp.training import adamw8bit

    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": saved_group["params"]}
        for saved_group, group in zip(state["param_groups"], optimizer.param_groups, strict=True)
    ]
    if saved in EIGHT_BIT:
        converted = adamw8bit.dequantise_moments(state["state"])
        change = "moments dequantised to fp32"
    else:
        full_precision = {
            name for group in groups if group.get("optim_bits") == 32 for name in group["params"]
        }

        def eight_bit(name: str) -> bool:
            big = state["state"][name]["exp_avg"].numel() >= adamw8bit.MIN_8BIT_SIZE
            return big and name not in full_precision

        converted = adamw8bit.quantise_moments(state["state"], eight_bit)
        change = "fp32 moments quantised to 8 bits"
    logger.info("resume: the checkpoint's %s %s for optim.name=%s", saved, change, wanted)
    return {"state": converted, "param_groups": groups}


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
    optimizer: torch.optim.Optimizer,
    config: OptimConfig,
    total_steps: int,
    apart_end: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step with warmup + cosine, reaching 0 at
    ``total_steps``; the groups marked ``apart`` (:func:`parameter_groups`) reach it at
    ``apart_end`` instead (ProtoCLIP's image tower: when its LiT episodes start) and stay there."""
    plain = WarmupCosine(config.warmup_steps, total_steps)
    own = plain if apart_end is None else WarmupCosine(config.warmup_steps, apart_end)
    factors: list[Callable[[int], float]] = [
        own if group.get("apart") else plain for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every param group's hyper-parameters (all but ``params``; the base lr as ``initial_lr``)."""
    return [
        {k: v for k, v in group.items() if k != "params"} | {"initial_lr": _base_lr(group)}
        for group in optimizer.param_groups
    ]


def _base_lr(group: dict[str, Any]) -> float:
    return float(group.get("initial_lr", group["lr"]))


def _plain(value: Any) -> Any:
    """Betas come back from a JSON checkpoint as a list: compare (and print) them as a tuple."""
    return tuple(value) if isinstance(value, list) else value


def keep_config_settings(
    optimizer: torch.optim.Optimizer, scheduler: Any, wanted: list[dict[str, Any]]
) -> list[str]:
    """After a resume, put back the config's hyper-parameters ``wanted`` (:func:`group_settings`
    taken before loading); the checkpoint keeps only the moments and step counts.

    ``optimizer.load_state_dict`` restores the checkpoint's lr, weight decay and betas while
    config.yaml records the new ones. The scheduler's base lrs follow the config too, and the
    current lr is the new base lr at the resumed step. Logs (INFO) and returns what changed.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
    changes = []
    for index, (group, settings) in enumerate(zip(optimizer.param_groups, wanted, strict=True)):
        old = {**{k: _plain(group.get(k)) for k in settings}, "lr": _base_lr(group)}
        new = {**{k: _plain(v) for k, v in settings.items()}, "lr": settings["initial_lr"]}
        changed = [
            f"{k} {old[k]} → {new[k]}"
            for k in ("lr", *sorted(set(settings) - {"lr", "initial_lr"}))
            if old[k] != new[k]
        ]
        if changed:
            changes.append(f"group {index}: " + ", ".join(changed))
        group.update({k: v for k, v in settings.items() if k != "lr"})
    inner.base_lrs = [settings["initial_lr"] for settings in wanted]
    groups = optimizer.param_groups
    for group, base, factor in zip(groups, inner.base_lrs, inner.lr_lambdas, strict=True):
        group["lr"] = base * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    _place_fused_steps(optimizer)
    if changes:
        logger.info(
            "resume: the config's optimizer settings replace the checkpoint's (moments and step "
            "counts kept): %s",
            "; ".join(changes),
        )
    return changes


def _place_fused_steps(optimizer: torch.optim.Optimizer) -> None:
    """A fused group's step counts as the fused kernel reads them: float32 on the parameter's
    device. ``load_state_dict`` places them by the CHECKPOINT's ``fused`` flag, so an unfused
    run's counts (CPU tensors) would stay on the CPU once the config turns the kernel on."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(param.device, torch.float32)
