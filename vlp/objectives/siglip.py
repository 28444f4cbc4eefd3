"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), through vlp's exact distributed core."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from vlp.distributed import sigmoid_loss
from vlp.models.vlp_model import VlpModel
from vlp.objectives.base import Coupled, Objective, Output, Shared, Tensors
from vlp.objectives.clip import clamp_logit_scale
from vlp.objectives.registry import register_objective


@register_objective("siglip")
class SigLipObjective(Objective):
    """Pairwise sigmoid loss over the (group's) global batch with a learned scale and bias.

    Features: ``image_features``, ``text_features`` ``[b, d]`` and ``logit_scale``,
    ``logit_bias`` (the model is built with SigLIP's init: s = 10, β = −10). Returns
    ``{"sigmoid_loss": scalar}``.

    Example:
        >>> losses = SigLipObjective().batch_loss(model(images, texts))  # doctest: +SKIP
    """

    model_kwargs: ClassVar[dict[str, Any]] = {
        "init_logit_scale": math.log(10.0),
        "init_logit_bias": -10.0,
    }

    outputs: ClassVar[Mapping[str, Output]] = {
        "image_features": Coupled(),
        "text_features": Coupled(),
        "logit_scale": Shared(),
        "logit_bias": Shared(),
    }

    def encode(self, model: VlpModel, inputs: Mapping[str, Any]) -> Tensors:
        """CLIP's outputs plus the learned bias β."""
        outputs = super().encode(model, inputs)
        bias = getattr(model.clip, "logit_bias", None)
        if bias is not None:
            outputs["logit_bias"] = bias
        return outputs

    def after_step(self, model: VlpModel) -> None:
        """Clamp the learned scale as CLIP does (open_clip's SigLIP recipe keeps it too)."""
        clamp_logit_scale(model)

    def batch_loss(self, features: Tensors) -> Tensors:
        """The sigmoid term on this rank's local embeddings (texts travel around the group)."""
        if "logit_bias" not in features:
            raise ValueError(
                "the siglip objective needs a model with a logit bias (open_clip "
                "'init_logit_bias'); the model returned no 'logit_bias'"
            )
        loss = sigmoid_loss(
            features["image_features"],
            features["text_features"],
            features["logit_scale"],
            features["logit_bias"],
            group=self.group,
            tile_size=self.tile_size,
        )
        return {"sigmoid_loss": loss}
