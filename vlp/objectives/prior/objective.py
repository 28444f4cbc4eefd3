"""PRIOR (Chen, Peng, Zhang, Ji 2025, arXiv 2505.08971) on a CoCa-style model, and the
text-only reference LM P_r it needs, as two objectives of the v2 contract.

``prior_reference`` trains P_r: a causal LM (:class:`TinyCausalLM`, the captioning model's
vocabulary and context length) on the captions of the training shards, without images. It runs
through the ordinary trainer (``vlp prior train-reference`` is ``vlp train`` with this
objective), so it gets Accelerate, checkpoints and exact resume; the LM is the run's
``heads["lm"]`` and the open_clip model beside it is frozen and unused.

``prior`` trains a CoCa model (open_clip ``coca_model.py``; ``vlp-tiny-coca`` on the CPU):
L = w_c·L_contrastive + w_cap·L_PRIOR, CoCa's weights (1, 2) by default. L_contrastive goes
through the shared tiled core (batch-coupled); L_PRIOR = −Σ_i ŵ_i log p(t_i | v, t_<i) averaged
over the batch's caption tokens as CoCa's caption loss is, per micro-batch (its logits are
``PerSample``: GradCache never caches them). Token weights (the paper's formula, its exponent α
"empirically set to 1", the default): w_i = (1 − P_r(t_i | t_<i))^α, ŵ = k·w/Σw over a caption's k
tokens (:func:`~vlp.objectives.prior.weights.token_weights`); the end-of-text token weighs 1
outside that normalisation by default (``end_token``: the paper does not say). P_r is frozen
(:meth:`VlpModel.attach_frozen`: not optimised, wrapped, checkpointed or exported). α = 0, or
no ``reference``, is plain CoCa captioning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vlp.distributed import contrastive_loss
from vlp.models.tokenizers import run_tokenizer_file
from vlp.models.vlp_model import HEADS_FILE, VlpModel
from vlp.objectives.base import (
    ConfiguredObjective,
    Coupled,
    Fields,
    Output,
    PerSample,
    Shared,
    Tensors,
    learned_scale,
)
from vlp.objectives.clip import clamp_logit_scale
from vlp.objectives.prior.reference_lm import TinyCausalLM, load_reference_lm
from vlp.objectives.prior.weights import (
    END_TOKEN_CHOICES,
    reference_target_logprobs,
    token_weights,
    weighted_caption_loss,
)
from vlp.objectives.registry import register_objective
from vlp.run_folder import checkpoints_dir, list_checkpoints

logger = logging.getLogger(__name__)

PAD_ID = 0
"""open_clip's tokenizers pad with id 0 (CoCa's ``pad_id``)."""
SIDECAR_KEY = "reference_logprobs"
"""Batch key of the precomputed log P_r(t_i | t_<i) (``[b, L-1]``, ``vlp prior weights``)."""


def _text_cfg(clip: Any) -> tuple[int, int]:
    """(vocab size, context length) of a CoCa/CLIP model's text tower."""
    text: Any = getattr(clip, "text", None)
    vocab = int(getattr(text, "vocab_size", 0) or clip.token_embedding.num_embeddings)
    context = int(getattr(text, "context_length", 0) or clip.context_length)
    return vocab, context


@dataclass
class PriorReferenceSettings:
    """``objective.prior_reference.*``: the reference LM's size."""

    width: int = 64
    """Width of the reference LM's transformer."""
    layers: int = 2
    """Transformer blocks of the reference LM."""
    heads: int = 4
    """Attention heads per block (``width`` must divide by it)."""

    def validate(self) -> None:
        """Reject sizes that cannot build."""
        if min(self.width, self.layers, self.heads) < 1 or self.width % self.heads:
            raise ValueError("width, layers, heads must be >= 1 and heads must divide width")


@register_objective("prior_reference")
class PriorReferenceObjective(ConfiguredObjective):
    """Next-token cross-entropy of a text-only LM on the captions (P_r of PRIOR)."""

    Config = PriorReferenceSettings
    settings: PriorReferenceSettings
    outputs: ClassVar[Mapping[str, Output]] = {"lm_logits": PerSample(), "tokens": PerSample()}
    evaluations: ClassVar[tuple[str, ...]] = ()  # the towers stay untrained; the LM's loss tells

    def fields(self) -> Fields:
        """The caption (an image view is still decoded: the stream needs one; it is unused)."""
        return Fields()

    def build_model(self, clip: nn.Module) -> VlpModel:
        """The open_clip model frozen (unused), the LM as the only trainable head."""
        clip.requires_grad_(False)
        return super().build_model(clip)

    def heads(self, clip: nn.Module) -> dict[str, nn.Module]:
        """``lm``: a :class:`TinyCausalLM` over the model's vocabulary and context length."""
        vocab, context = _text_cfg(clip)
        s = self.settings
        return {"lm": TinyCausalLM(vocab, context, s.width, s.layers, s.heads)}

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The caption tokens only."""
        return {"text": batch["text"]}

    def encode(self, model: VlpModel, inputs: Mapping[str, Any]) -> Tensors:
        """Next-token logits of the LM."""
        return {"lm_logits": model.heads["lm"](inputs["text"]), "tokens": inputs["text"]}

    def sample_loss(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """Mean next-token cross-entropy over the captions' non-padding targets."""
        logits, tokens = outputs["lm_logits"][:, :-1], outputs["tokens"][:, 1:]
        loss = F.cross_entropy(logits.transpose(1, 2), tokens, ignore_index=PAD_ID)
        return {"lm_loss": loss}


def load_reference_run(
    run_dir: str | Path, clip: nn.Module, tokenizer: Any | None = None
) -> TinyCausalLM:
    """P_r from the newest checkpoint of a ``prior_reference`` run, checked against ``clip``'s
    vocabulary and context length and, given the captioning model's ``tokenizer``, against it:
    the run must have read its captions with the same SentencePiece file (the same bytes), or
    both with the model's own tokenizer. The LM must read the captioning model's token ids."""
    checkpoints = list_checkpoints(checkpoints_dir(run_dir))
    if not checkpoints:
        raise ValueError(f"reference '{run_dir}' holds no complete checkpoint (checkpoints/)")
    newest = checkpoints[-1]
    meta = json.loads((newest / "model_config.json").read_text())
    objective = meta.get("objective", {})
    if objective.get("name") != "prior_reference":
        raise ValueError(
            f"reference '{run_dir}' was trained with objective '{objective.get('name')}', not "
            "prior_reference (make one with `vlp prior train-reference`)"
        )
    text_cfg = meta["model_cfg"]["text_cfg"]
    ours = _text_cfg(clip)
    theirs = (int(text_cfg["vocab_size"]), int(text_cfg["context_length"]))
    if ours != theirs:
        raise ValueError(
            f"reference '{run_dir}' reads vocab/context {theirs}, the captioning model {ours}: "
            "P_r must use the captioning model's tokenizer"
        )
    if tokenizer is not None:
        _check_run_tokenizer(run_dir, run_tokenizer_file(newest), tokenizer)
    settings = PriorReferenceSettings(**objective.get("settings", {}))
    lm = TinyCausalLM(*theirs, settings.width, settings.layers, settings.heads)
    state = {k[len("lm.") :]: v for k, v in load_file(str(newest / HEADS_FILE)).items()}
    lm.load_state_dict(state)
    logger.info("PRIOR: reference LM P_r loaded from %s", newest)
    return lm


def _check_run_tokenizer(run_dir: str | Path, theirs: Path | None, tokenizer: Any) -> None:
    """Raise unless a reference run's SentencePiece file (None: the model's own tokenizer) is
    the one ``tokenizer`` reads: equal vocabulary sizes do not make equal vocabularies."""
    ours = getattr(tokenizer, "model_file", None)
    same = theirs is None and ours is None
    same = same or (theirs is not None and ours is not None and theirs.is_file()
                    and theirs.read_bytes() == Path(ours).read_bytes())  # fmt: skip
    if not same:
        raise ValueError(
            f"reference '{run_dir}' read its captions with {_tokenizer_name(theirs)}, the "
            f"captioning model reads them with {_tokenizer_name(ours)}: P_r must use the "
            "captioning model's tokenizer"
        )


def _tokenizer_name(model_file: Path | None) -> str:
    return f"SentencePiece '{model_file}'" if model_file else "the model's own tokenizer"


def load_reference(reference: str | Path, clip: nn.Module, tokenizer: Any | None) -> nn.Module:
    """P_r from a ``prior_reference`` run (checked against ``clip``'s vocabulary and context),
    or a transformers causal LM (a local folder or a hub name) checked against ``tokenizer``,
    the captioning model's. Raises ValueError (TokenizerMismatchError included) in one line."""
    if checkpoints_dir(reference).is_dir():
        return load_reference_run(reference, clip, tokenizer)
    if tokenizer is None:
        raise ValueError(
            f"reference '{reference}' is not a prior_reference run (no checkpoints/ in it); "
            "a transformers causal LM needs the captioning model's tokenizer to be checked "
            "against, and none was given (Objective.use_tokenizer)"
        )
    try:
        return load_reference_lm(str(reference), tokenizer)
    except OSError as error:
        raise ValueError(
            f"reference '{reference}' is neither a prior_reference run nor a transformers "
            f"causal LM that loads here ({str(error).splitlines()[0]})"
        ) from None


@dataclass
class PriorSettings:
    """``objective.prior.*``: CoCa's loss weights and PRIOR's token weights."""

    reference: str = ""
    """P_r: a ``prior_reference`` run folder, or a transformers causal LM (a local folder in
    ``save_pretrained`` layout, or a hub name, downloaded when a network is there) whose
    tokenizer is the captioning model's (else refused). Empty: no re-weighting (plain CoCa)."""
    sidecar: str = ""
    """P_r's log-probabilities precomputed by ``vlp prior weights`` (a ``.safetensors`` file
    keyed by sample key), used instead of running P_r online; ``reference`` is then unused.
    Part of the stream's resume fingerprint."""
    alpha: float = 1.0
    """Exponent of 1 − P_r (the paper's α, which it sets to 1; 0: plain CoCa)."""
    end_token: str = "fixed"
    """How a caption's end-of-text token is weighed (the paper does not say): ``fixed`` at
    weight 1 and left out of the other tokens' normalisation, or ``weighted`` like any token
    (:func:`~vlp.objectives.prior.weights.token_weights`). ``fixed`` is the default as the
    better one measured (benchmarks/RESULTS.md "PRIOR vs CoCa": higher BLEU-4, CIDEr and
    zero-shot means over 3 seeds, within the seeds' spread). Applied when the weights are
    computed from log P_r, so one ``vlp prior weights`` sidecar serves both."""
    contrastive_weight: float = 1.0
    """Weight of the contrastive (CLIP) loss."""
    caption_weight: float = 2.0
    """Weight of the re-weighted captioning loss (CoCa's 2)."""

    def validate(self) -> None:
        """Reject settings that cannot train."""
        if self.alpha < 0 or self.contrastive_weight < 0 or self.caption_weight < 0:
            raise ValueError("alpha and the loss weights must be >= 0")
        if self.end_token not in END_TOKEN_CHOICES:
            raise ValueError(
                f"end_token must be one of {', '.join(END_TOKEN_CHOICES)}, got '{self.end_token}'"
            )
        if self.sidecar and not Path(self.sidecar).is_file():
            raise ValueError(
                f"sidecar '{self.sidecar}' is not a file (make it with `vlp prior weights`)"
            )


@register_objective("prior")
class PriorObjective(ConfiguredObjective):
    """CoCa's contrastive + captioning loss with PRIOR's token weights (module docstring)."""

    Config = PriorSettings
    evaluations: ClassVar[tuple[str, ...]] = ("zeroshot", "retrieval", "captioning")
    sidecar_commands: ClassVar[Mapping[str, str]] = {
        SIDECAR_KEY: "vlp prior weights --reference {reference} --shards {shards} --out {path}"
    }
    tokenized_sidecars: ClassVar[frozenset[str]] = frozenset({SIDECAR_KEY})
    settings: PriorSettings
    outputs: ClassVar[Mapping[str, Output]] = {
        "image_features": Coupled(),
        "text_features": Coupled(),
        "logit_scale": Shared(),
        "logits": PerSample(),
        "labels": PerSample(),
        "token_weights": PerSample(),
    }

    def fields(self) -> Fields:
        """One image view and the caption; the sidecar's log-probabilities when there is one."""
        sidecars = {SIDECAR_KEY: self.settings.sidecar} if self.settings.sidecar else {}
        return Fields(sidecars=sidecars)

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Image and caption (and the precomputed log-probabilities)."""
        keys = ("image", "text", SIDECAR_KEY)
        return {key: batch[key] for key in keys if key in batch}

    def build_model(self, clip: nn.Module) -> VlpModel:
        """A CoCa model (refused otherwise) with P_r attached frozen when there is one."""
        if not hasattr(clip, "text_decoder"):
            raise ValueError(
                f"PRIOR needs a CoCa model (a captioning decoder); this model is "
                f"{type(clip).__name__}: pick e.g. coca_ViT-B-32 or vlp-tiny-coca"
            )
        model = super().build_model(clip)
        s = self.settings
        if s.reference and not s.sidecar:
            model.attach_frozen("reference", self._reference(clip))
        if s.alpha == 0 or not (s.reference or s.sidecar):
            why = "objective.prior.alpha=0" if s.alpha == 0 else "no objective.prior.reference"
            logger.info("PRIOR: %s, so every token weighs 1: plain CoCa", why)
        else:
            source = f"the sidecar {s.sidecar}" if s.sidecar else f"the reference LM {s.reference}"
            logger.info(
                "PRIOR: token weights (1 - P_r)^%g, end token %s, P_r from %s",
                s.alpha, s.end_token, source,
            )  # fmt: skip
        return model

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Keep the captioning model's tokenizer: a transformers reference LM must share it."""
        self._tokenizer = tokenizer

    def _reference(self, clip: nn.Module) -> nn.Module:
        """P_r (:func:`load_reference`), checked against the tokenizer ``use_tokenizer`` gave."""
        return load_reference(self.settings.reference, clip, getattr(self, "_tokenizer", None))

    def encode(self, model: VlpModel, inputs: Mapping[str, Any]) -> Tensors:
        """CoCa's forward (embeddings, caption logits and labels) and the token weights."""
        out = model.clip(inputs["image"], inputs["text"])
        labels = out["labels"]
        mask = labels != PAD_ID
        s = self.settings
        if SIDECAR_KEY in inputs and s.alpha != 0:
            logprobs = inputs[SIDECAR_KEY].to(labels.device)
        elif s.reference and s.alpha != 0:
            reference = model.frozen("reference").to(labels.device)
            logprobs, _ = reference_target_logprobs(reference, inputs["text"], PAD_ID)
        else:
            logprobs = None
        if logprobs is None:
            weights = mask.to(out["logits"].dtype)
        else:
            weights = token_weights(logprobs, mask, s.alpha, s.end_token).to(out["logits"].dtype)
        return {
            "image_features": out["image_features"],
            "text_features": out["text_features"],
            "logit_scale": learned_scale(model),
            "logits": out["logits"],
            "labels": labels,
            "token_weights": weights,
        }

    def after_step(self, model: VlpModel) -> None:
        """Clamp the learned scale (s <= 100), as CLIP/CoCa do."""
        clamp_logit_scale(model)

    def batch_loss(self, features: Tensors) -> Tensors:
        """CoCa's contrastive term through the shared core."""
        loss = contrastive_loss(
            features["image_features"],
            features["text_features"],
            features["logit_scale"],
            group=self.group,
            tile_size=self.tile_size,
        )
        return {"contrastive_loss": self.settings.contrastive_weight * loss}

    def sample_loss(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """The re-weighted caption cross-entropy of this micro-batch (weight ``caption_weight``)."""
        loss = weighted_caption_loss(
            outputs["logits"], outputs["labels"], outputs["token_weights"], PAD_ID
        )
        return {"caption_loss": self.settings.caption_weight * loss}
