"""8-bit AdamW and 8-bit StableAdamW: block-wise quantised moments (Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization") through bitsandbytes.

Each moment of a big tensor is stored as one byte per element plus one fp32 absmax per block of
256: the first moment on bitsandbytes' signed dynamic map, the second on its unsigned one, so the
state costs ~2 bytes per parameter instead of AdamW's 8. A step dequantises, updates in fp32
and quantises again. bitsandbytes (>= 0.49) runs this on the CPU (its own torch kernels) and on
CUDA (fused kernels); torchao's ``AdamW8bit`` also runs on both but compiles its step with
``torch.compile`` and keeps its state as tensor subclasses, which safetensors cannot store.

**Which parameters keep 32-bit moments**: every parameter of the undecayed group (scalars,
biases, norm gains, the logit scale and bias, and whatever an objective excludes from decay) and
every tensor under 4,096 elements (bitsandbytes' ``min_8bit_size``); the others (weight
matrices, embeddings) get 8-bit moments. The rule rides on the parameter groups: a group with
``optim_bits: 32`` keeps fp32 moments (:func:`vlp.training.optim.create_optimizer` sets it).

The state holds plain tensors (``state1``/``state2``: uint8 or fp32, ``absmax1``/``absmax2``)
and an int ``step``; the quantisation maps are constants (the same tensor for every parameter),
left out of the saved state and put back on load. :func:`quantise_moments` and
:func:`dequantise_moments` convert AdamW's fp32 state to this layout and back, for a resume
with another ``optim.name``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as F

from vlp.training.stable_adamw import UPDATE_CLIP, stable_adamw_update

BLOCK = 256
"""Elements per quantisation block (bitsandbytes' block-wise optimizer kernels use 256)."""
MIN_8BIT_SIZE = 4096
"""Tensors with fewer elements keep fp32 moments (bitsandbytes' default)."""
_QMAPS = {"qmap1": "dynamic", "qmap2": "udynamic"}
_WRAPPED = bnb.optim.optimizer.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY
"""bitsandbytes nests the quantisation tensors of a state dict under this key."""


class AdamW8bit(bnb.optim.AdamW8bit):
    """bitsandbytes' 8-bit AdamW, with fp32 moments for groups marked ``optim_bits: 32`` and a
    state dict without the (constant, shared) quantisation maps."""

    def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
        config = super().get_config(gindex, pindex, group)
        config["optim_bits"] = group.get("optim_bits", config["optim_bits"])
        return config

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for param_state in state["state"].values():
            for key in _QMAPS:
                param_state.get(_WRAPPED, {}).pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        super().load_state_dict(state_dict, move_to_device)
        if "dynamic" not in self.name2qmap:
            self.fill_qmap()
        for param, param_state in self.state.items():
            if param_state.get("state1", torch.empty(0)).dtype == torch.uint8:
                for key, name in _QMAPS.items():
                    param_state[key] = self.name2qmap[name] = self.name2qmap[name].to(param.device)


class StableAdamW8bit(AdamW8bit):
    """StableAdamW (:mod:`vlp.training.stable_adamw`) on :class:`AdamW8bit`'s state: each step
    dequantises the moments, runs the fp32 StableAdamW update and quantises them again."""

    def __init__(self, *args: Any, clip: float = UPDATE_CLIP, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clip = clip

    @torch.no_grad()
    def update_step(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
        grad = cast(torch.Tensor, p.grad)  # step() calls this for parameters with a gradient only
        state = self.state[p]
        state["step"] += 1
        settings = {
            "lr": group["lr"], "betas": tuple(group["betas"][:2]), "eps": group["eps"],
            "weight_decay": group["weight_decay"], "clip": self.clip,
        }  # fmt: skip
        if state["state1"].dtype != torch.uint8:
            stable_adamw_update(
                p, grad, state["state1"], state["state2"], state["step"], **settings
            )
            return
        exp_avg, exp_avg_sq = (
            F.dequantize_blockwise(
                state[f"state{i}"], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"],
                blocksize=BLOCK,
            )
            for i in (1, 2)
        )  # fmt: skip
        stable_adamw_update(p, grad, exp_avg, exp_avg_sq, state["step"], **settings)
        for i, moment in ((1, exp_avg), (2, exp_avg_sq)):
            F.quantize_blockwise(
                moment, code=state[f"qmap{i}"], absmax=state[f"absmax{i}"],
                out=state[f"state{i}"], blocksize=BLOCK,
            )  # fmt: skip


def quantise_moments(
    state: dict[str, dict[str, Any]], eight_bit: Callable[[str], bool]
) -> dict[str, dict[str, Any]]:
    """AdamW's per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq`` by parameter name) in
    :class:`AdamW8bit`'s layout; ``eight_bit(name)`` says which parameters get 8-bit moments."""
    converted = {}
    for name, entry in state.items():
        moments: dict[str, torch.Tensor] = {}
        for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
            moment = entry[key].float()
            if eight_bit(name):
                values, quant = F.quantize_blockwise(moment, code=_qmap(i), blocksize=BLOCK)
                moments |= {f"state{i}": values, f"absmax{i}": quant.absmax}
            else:
                moments[f"state{i}"] = moment
        converted[name] = {"step": int(entry["step"]), _WRAPPED: moments}
    return converted


def dequantise_moments(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:class:`AdamW8bit`'s per-parameter state in AdamW's layout (fp32 moments, a float step)."""
    converted = {}
    for name, entry in state.items():
        flat = {**entry, **entry.get(_WRAPPED, {})}
        moments = []
        for i in (1, 2):
            moment = flat[f"state{i}"]
            if moment.dtype == torch.uint8:
                moment = F.dequantize_blockwise(
                    moment, absmax=flat[f"absmax{i}"], code=_qmap(i), blocksize=BLOCK
                )
            moments.append(moment)
        step = torch.tensor(float(flat["step"]))
        converted[name] = {"step": step, "exp_avg": moments[0], "exp_avg_sq": moments[1]}
    return converted


def _qmap(moment: int) -> torch.Tensor:
    """bitsandbytes' quantisation map of the first (signed) or second (unsigned) moment."""
    return F.create_dynamic_map(signed=moment == 1)
