"""`vlp export --format transformers`: a run's CLIP as a Hugging Face transformers ``CLIPModel``
folder, loadable with ``CLIPModel.from_pretrained(OUT)`` and ``CLIPProcessor.from_pretrained(OUT,
backend="pil")``, without open_clip or vlp.

What maps: an open_clip ``CLIP`` built from open_clip's own ViT image tower and text transformer
with their default layout (class-token pooling, argmax/end-of-text text pooling, LayerNorm eps
1e-5, no layer scale, no custom attention, linear bias-free projections), GELU or QuickGELU, and
open_clip's bundled BPE tokenizer; vlp's ``vlp-tiny-vit`` and ``vlp-tiny-vit-64`` and open_clip's
plain ``ViT-*`` configs are such models. The weights are renamed, the fused attention
``in_proj`` is split into ``q_proj``/``k_proj``/``v_proj``, the projections are transposed; the
converted state dict is loaded strictly (every ``CLIPModel`` tensor filled, every open_clip
tensor used), so a model that converts computes the same embeddings (fp32: within 1e-5).

Everything else is refused with :class:`UnmappableModelError`, whose message names the reason:
CoCa and custom-text models, Hugging Face text towers, ResNet and timm image towers, objective
heads (ConVIRT's projections), a SigLIP ``logit_bias`` (``CLIPModel`` has no place for it),
attention pooling and other non-default tower options, SentencePiece and Hugging Face
tokenizers. open_clip's SigLIP configs (``ViT-*-SigLIP*``) use timm image towers and Hugging
Face tokenizers, so no SigLIP model maps to transformers' ``SiglipModel`` here; no shipped
config is one.

The tokenizer is open_clip's vocabulary and merges as a ``CLIPTokenizer`` (``vocab.json``,
``merges.txt``, ``tokenizer.json``). It gives open_clip's ids, except that open_clip first
repairs text with ``ftfy`` and unescapes HTML (``it’s`` → ``it's``, ``&amp;`` → ``&``) and
transformers only applies NFC, whitespace cleaning and lowercasing; it pads with
``<|endoftext|>`` where open_clip pads with 0, which the end-of-text pooling never reads.
The image processor (PIL backend) resizes and crops like open_clip's; transformers' default
torchvision backend resizes tensors instead, which moves pixels by up to ~0.015 (normalised).
Both center crops agree except when the resized side exceeds the crop by 3 mod 4 pixels
(torchvision rounds half to even, transformers floors): then the crop is one pixel apart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from evals.loading import LoadedModel

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

LAYER_NORM_EPS = 1e-5
"""open_clip's ``nn.LayerNorm`` default, which CLIP configs without ``norm_kwargs`` keep."""

_VISION_MAPPED = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_VISION_INERT = {"patch_dropout", "timm_model_pretrained", "timm_pool", "timm_proj"}
"""Vision settings with no effect at inference (patch dropout) or only on a timm tower (refused)."""
_TEXT_MAPPED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TEXT_INERT = {"pad_id", "eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
"""Text settings read only by options that are refused (CLS embedding, eos pooling, HF towers)."""
_TOP_MAPPED = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
_TOP_INERT = {"nonscalar_logit_scale"}

# open_clip block → transformers layer, for the tensors that only change name
_BLOCK_NAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_NAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
BOS_ID, EOS_ID = 49406, 49407
"""open_clip's start- and end-of-text ids (its BPE vocabulary's last two tokens)."""
_OPEN_CLIP_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


class UnmappableModelError(ValueError):
    """A model that transformers' ``CLIPModel`` cannot hold exactly; the message says why."""


def _non_default(cfg: dict[str, Any], cls: type, allowed: set[str]) -> list[str]:
    """``key=value`` for each setting of ``cfg`` outside ``allowed`` that differs from ``cls``'s default."""
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(cls)
        if field.default is not dataclasses.MISSING
    }
    return [
        f"{key}={value!r}"
        for key, value in sorted(cfg.items())
        if key not in allowed and (key not in defaults or value != defaults[key])
    ]


def check_mappable(loaded: LoadedModel) -> None:
    """Raise :class:`UnmappableModelError` unless ``loaded`` converts exactly to ``CLIPModel``."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from vlp.models.vlp_model import VlpModel

    model, _, tokenizer, info = loaded
    cfg = info.model_cfg
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})

    def refuse(reason: str) -> UnmappableModelError:
        name = info.pretrained if info.kind in ("run", "checkpoint") else info.name
        return UnmappableModelError(
            f"'{name}' does not map to transformers' CLIPModel: {reason}; "
            "export it with --format open_clip"
        )

    if isinstance(model, VlpModel) and len(model.heads):
        raise refuse("its objective's heads (heads.safetensors) have no place in CLIPModel")
    if isinstance(model, VlpModel) and model.text_pool != "eot":
        raise refuse(
            f"its text embeddings are pooled with text_pool={model.text_pool} (PyramidCLIP), "
            "CLIPModel's at the end-of-text token"
        )
    if "multimodal_cfg" in cfg:
        raise refuse("it is a CoCa model (a captioning decoder)")
    if cfg.get("init_logit_bias") is not None or getattr(model, "logit_bias", None) is not None:
        raise refuse("it has a SigLIP logit_bias, which CLIPModel's logits lack")
    if vision.get("timm_model_name"):
        raise refuse(f"its image tower is timm's {vision['timm_model_name']!r}")
    if isinstance(vision.get("layers"), list | tuple):
        raise refuse("its image tower is a ResNet")
    if text.get("hf_model_name"):
        raise refuse(f"its text tower is Hugging Face's {text['hf_model_name']!r}")
    if info.tokenizer_file is not None or text.get("hf_tokenizer_name"):
        raise refuse("it uses its own tokenizer, not open_clip's BPE")
    if type(model) is not open_clip.CLIP:
        raise refuse(f"it is an open_clip {type(model).__name__}, not a CLIP")
    unsupported = (
        [f"{key}={value!r}" for key, value in sorted(cfg.items())
         if key not in _TOP_MAPPED | _TOP_INERT and value is not None and value is not False]
        + [f"vision_cfg.{s}" for s in _non_default(vision, CLIPVisionCfg, _VISION_MAPPED | _VISION_INERT)]
        + [f"text_cfg.{s}" for s in _non_default(text, CLIPTextCfg, _TEXT_MAPPED | _TEXT_INERT)]
    )  # fmt: skip
    if unsupported:
        raise refuse(f"CLIPModel has no equivalent of {', '.join(unsupported)}")
    size = vision.get("image_size", 224)
    if isinstance(size, list | tuple) and len(set(size)) != 1:
        raise refuse(f"its images are not square ({size})")
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) or (
        tokenizer.clean_fn is not open_clip.tokenizer._clean_lower
        or tokenizer.reduction_fn is not None
        or len(tokenizer.encoder) != text.get("vocab_size", 49408)
    ):
        raise refuse("its tokenizer is not open_clip's default BPE (lower-casing, no extra tokens)")
    if info.preprocess_cfg.get("resize_mode", "shortest") == "longest":
        raise refuse("its preprocessing pads to a square (resize_mode 'longest')")


def _split_blocks(state: dict[str, Tensor], src: str, dst: str, layers: int) -> dict[str, Tensor]:
    """One tower's residual blocks, popped from ``state`` and renamed; ``in_proj`` split in 3."""
    out: dict[str, Tensor] = {}
    for i in range(layers):
        ours, theirs = f"{src}.resblocks.{i}.", f"{dst}.layers.{i}."
        for kind in ("weight", "bias"):
            fused = state.pop(f"{ours}attn.in_proj_{kind}").chunk(3)  # rows: q, then k, then v
            for name, tensor in zip("qkv", fused, strict=True):
                out[f"{theirs}self_attn.{name}_proj.{kind}"] = tensor
            for name, hf_name in _BLOCK_NAMES.items():
                out[f"{theirs}{hf_name}.{kind}"] = state.pop(f"{ours}{name}.{kind}")
    return out


def clip_state_dict(
    open_clip_state: dict[str, Tensor], vision_layers: int, text_layers: int
) -> dict[str, Tensor]:
    """An open_clip ``CLIP`` state dict renamed for transformers' ``CLIPModel``.

    Raises UnmappableModelError if a tensor is left unmapped (a tower option not covered).
    """
    state = dict(open_clip_state)
    out = _split_blocks(state, "visual.transformer", "vision_model.encoder", vision_layers)
    out |= _split_blocks(state, "transformer", "text_model.encoder", text_layers)
    out |= {hf_name: state.pop(name) for name, hf_name in _TOP_NAMES.items()}
    out["visual_projection.weight"] = state.pop("visual.proj").T
    out["text_projection.weight"] = state.pop("text_projection").T
    out["logit_scale"] = state.pop("logit_scale").reshape(())
    if state:
        raise UnmappableModelError(
            f"open_clip tensors with no CLIPModel equivalent: {', '.join(sorted(state))}"
        )
    return {name: tensor.detach().cpu().contiguous() for name, tensor in out.items()}


def clip_config(model_cfg: dict[str, Any], logit_scale: float) -> CLIPConfig:
    """transformers' ``CLIPConfig`` for an open_clip CLIP config that :func:`check_mappable` passed.

    The text config's ``eos_token_id`` is open_clip's end-of-text id (49407): transformers pools
    at its first occurrence, the position open_clip's argmax pooling picks (it is the largest id).
    """
    from transformers import CLIPConfig

    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # nn.GELU: the erf form
    size = vision.get("image_size", 224)
    width, text_width = vision.get("width", 768), text.get("width", 512)
    return CLIPConfig(
        projection_dim=model_cfg["embed_dim"],
        logit_scale_init_value=logit_scale,
        vision_config={
            "hidden_size": width,
            "intermediate_size": int(width * vision.get("mlp_ratio", 4.0)),
            "projection_dim": model_cfg["embed_dim"],
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": width // vision.get("head_width", 64),
            "image_size": size[0] if isinstance(size, list | tuple) else size,
            "patch_size": vision.get("patch_size", 16),
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
        },
        text_config={
            "vocab_size": text.get("vocab_size", 49408),
            "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "projection_dim": model_cfg["embed_dim"],
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,  # what the tokenizer pads with
        },
    )


def to_clip_model(model: torch.nn.Module, model_cfg: dict[str, Any]) -> CLIPModel:
    """transformers' ``CLIPModel`` holding ``model``'s weights (fp32, eval mode).

    The state dict is loaded strictly: a ``CLIPModel`` tensor left unfilled, or an open_clip one
    left over, raises. The weights are assigned, not copied: where no transpose or cast was
    needed, the ``CLIPModel`` shares its tensors with ``model``.
    """
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    state = {k: v.float() for k, v in model.state_dict().items()}
    config = clip_config(model_cfg, float(state["logit_scale"]))
    with no_init_weights():  # every tensor is replaced below: skip the random init
        clip = CLIPModel(config)
    text_cfg, vision_cfg = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    converted = clip_state_dict(state, vision_cfg.get("layers", 12), text_cfg.get("layers", 12))
    clip.load_state_dict(converted, strict=True, assign=True)
    return clip.eval()


def bpe_tables(tokenizer: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges (in rank order) of open_clip's ``SimpleTokenizer``, the special
    tokens under transformers' names.

    open_clip builds them from its bundled ``bpe_simple_vocab_16e6.txt.gz``: the 256 byte symbols
    (GPT-2's byte-to-unicode map), the same with ``</w>``, the first 49152-256-2 merges joined,
    then start- and end-of-text.
    """
    vocab = {_OPEN_CLIP_SPECIALS.get(token, token): i for token, i in tokenizer.encoder.items()}
    return vocab, sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)


def clip_tokenizer(tokenizer: Any) -> CLIPTokenizer:
    """open_clip's BPE ``SimpleTokenizer`` as a ``CLIPTokenizer`` (same vocabulary, merges and
    context length)."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_tables(tokenizer)
    # tokenizers' BPE takes merges as (left, right) pairs; transformers' hint says strings
    pairs: Any = merges
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=tokenizer.context_length)


def clip_processor(tokenizer: Any, preprocess_cfg: dict[str, Any]) -> CLIPProcessor:
    """A ``CLIPProcessor``: open_clip's eval preprocessing (size, resize mode, interpolation,
    mean/std) as a PIL-backend ``CLIPImageProcessor``, and :func:`clip_tokenizer`."""
    from transformers import CLIPProcessor
    from transformers.image_utils import PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = preprocess_cfg["size"]
    side = size[0] if isinstance(size, list | tuple) else size
    squash = preprocess_cfg.get("resize_mode") == "squash"
    bilinear = preprocess_cfg.get("interpolation") == "bilinear"  # else bicubic, as open_clip
    images = CLIPImageProcessorPil(
        size={"height": side, "width": side} if squash else {"shortest_edge": side},
        crop_size={"height": side, "width": side},
        do_center_crop=not squash,
        resample=PILImageResampling.BILINEAR if bilinear else PILImageResampling.BICUBIC,
        image_mean=list(preprocess_cfg["mean"]),
        image_std=list(preprocess_cfg["std"]),
    )
    return CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer(tokenizer))


def write_transformers(loaded: LoadedModel, folder: Path) -> None:
    """Write ``loaded`` into the existing, empty ``folder`` as a transformers CLIP folder.

    ``config.json`` + ``model.safetensors`` (``CLIPModel.save_pretrained``), the processor and
    tokenizer (``processor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``), and the
    tokenizer's ``vocab.json`` + ``merges.txt``.

    Raises:
        UnmappableModelError: the model does not map (:func:`check_mappable`).
    """
    check_mappable(loaded)
    model, _, tokenizer, info = loaded
    to_clip_model(model, info.model_cfg).save_pretrained(str(folder))
    clip_processor(tokenizer, info.preprocess_cfg).save_pretrained(str(folder))
    vocab, merges = bpe_tables(tokenizer)  # the classic files, for tokenizers reading them
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
