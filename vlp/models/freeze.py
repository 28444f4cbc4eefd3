"""Freeze the bottom of a Hugging Face text tower: its embeddings and first N layers.

ConVIRT (Zhang et al., 2022, §3.3) fine-tunes ClinicalBERT with its embeddings and first 6 of
12 transformer layers frozen: the lower layers keep their general language features, and
training is cheaper. open_clip's ``lock_text_tower(unlocked_layers=k)`` counts from the top,
prints, and leaves LayerNorms trainable by default; this counts from the bottom, as the paper
does, and freezes whole layers.
"""

from __future__ import annotations

from torch import nn

# Towers with BERT's module layout: ``embeddings`` and a ``encoder.layer`` list of layers.
_BERT_LIKE = "BERT, RoBERTa, XLM-RoBERTa, ELECTRA, MiniLM and other BertModel-style towers"


def _hf_tower(model: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix, module) of the first ``transformers`` model inside ``model``."""
    from transformers import PreTrainedModel

    for prefix, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return (f"{prefix}." if prefix else ""), module
    raise ValueError(
        f"freeze_text_layers: {type(model).__name__} has no Hugging Face text tower (an open_clip "
        "model with text_cfg.hf_model_name, its .text, or a transformers model); open_clip's "
        "own text transformer is frozen with model.lock_text_tower"
    )


def freeze_text_layers(model: nn.Module, n_layers: int) -> list[str]:
    """Freeze the HF text tower's embeddings and its first ``n_layers`` layers; return the names
    (as in ``model.named_parameters()``) of the parameters frozen.

    ``model`` is an open_clip model with an HF text tower, that tower (``model.text``) or a
    ``transformers`` model. Frozen parameters get ``requires_grad=False``: they receive no
    gradient and the optimizer never moves them. ``n_layers=0`` freezes the embeddings only.
    Build the optimizer and the DDP wrapper after this call (DDP records trainable parameters
    when it is built).

    >>> frozen = freeze_text_layers(model, 6)  # doctest: +SKIP  (ConVIRT: 6 of 12)
    """
    prefix, tower = _hf_tower(model)
    embeddings = getattr(tower, "embeddings", None)
    layers = getattr(getattr(tower, "encoder", None), "layer", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
        model_type = getattr(getattr(tower, "config", None), "model_type", "?")
        raise ValueError(
            f"freeze_text_layers knows towers laid out like BERT (.embeddings and "
            f".encoder.layer: {_BERT_LIKE}); the text tower is {type(tower).__name__} "
            f"(model_type '{model_type}'), which it does not know (T5, DistilBERT, GPT-style "
            "and other layouts are not supported)"
        )
    if not 0 <= n_layers <= len(layers):
        raise ValueError(
            f"freeze_text_layers: n_layers={n_layers}, but the text tower "
            f"{type(tower).__name__} has {len(layers)} layers; choose 0..{len(layers)}"
        )
    modules = {"embeddings": embeddings}
    modules.update({f"encoder.layer.{i}": layers[i] for i in range(n_layers)})
    frozen = []
    for module_name, module in modules.items():
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
            frozen.append(f"{prefix}{module_name}.{name}")
    return frozen
