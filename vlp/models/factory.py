"""Model creation over open_clip's factory, plus vlp's own tiny configs for CPU work.

A user names a model the way open_clip does (a built-in name, ``local-dir:``, ``hf-hub:``) or
gives a path to an open_clip model-config JSON; vlp registers its own tiny configs from
``model_configs/`` so that CPU runs need no download.

Hugging Face text towers: a config's ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` may be a
``vlp:<name>`` alias (``vlp.models.hf_towers.HF_TOWERS``), resolved to a local folder when the
model is built and in :func:`model_config` (what checkpoints record), so the config files hold
no machine-specific path. A tower that does not load is one line (``HFTowerError``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import torch
from open_clip import pretrained as open_clip_pretrained
from open_clip.transformer import PatchDropout
from torch import nn

from vlp.models.hf_towers import (
    HFTowerError,
    check_hf_tower,
    hf_tokenizer,
    quiet_hf_loading,
    resolve_text_cfg,
)
from vlp.models.tokenizers import sentencepiece_tokenizer

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class PretrainedError(ValueError):
    """``pretrained`` names weights that cannot be loaded: an unknown tag, a missing file, or a
    download while the Hugging Face hub is offline or unreachable."""


def refused_pickle(path: str, error: Exception) -> str:
    """One line for weights that ``torch.load(weights_only=True)`` refused: a pickle holding
    more than tensors, i.e. objects whose loading could run code."""
    reason = str(error).split("WeightsUnpickler error: ")[-1].splitlines()[0]
    return (
        f"weights file '{path}' holds pickled objects that are not plain tensors ({reason}); "
        "vlp loads weights only (no code runs). Convert it to safetensors from a source you trust"
    )


def register_vlp_configs() -> None:
    """Make vlp's tiny model configs known to open_clip by name (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def resolve_model_name(name_or_config: str) -> str:
    """Turn a model-config JSON path into a registered open_clip name; pass names through."""
    register_vlp_configs()
    if name_or_config.endswith(".json"):
        path = Path(name_or_config)
        if not path.is_file():
            raise FileNotFoundError(f"model config file '{path}' does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if ":" in name_or_config:  # local-dir: / hf-hub: schemas, resolved by open_clip
        return name_or_config
    if open_clip.get_model_config(name_or_config) is None:
        raise ValueError(
            f"unknown model '{name_or_config}': not an open_clip model config, a model-config "
            "JSON path, or a 'local-dir:'/'hf-hub:' name. See open_clip.list_models()."
        )
    return name_or_config


def model_config(name_or_config: str) -> dict[str, Any]:
    """The open_clip model config dict behind a name (what checkpoints and exports record).

    ``vlp:`` text-tower aliases come back resolved to local folders, so that open_clip alone
    (``local-dir:``) rebuilds the model from the recorded config.
    """
    name = resolve_model_name(name_or_config)
    if name.startswith("local-dir:"):
        config_file = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
        config = dict(json.loads(config_file.read_text())["model_cfg"])
    elif name.startswith("hf-hub:"):
        config = dict(open_clip.factory._get_hf_config(name.removeprefix("hf-hub:"))["model_cfg"])
    else:
        config = dict(open_clip.get_model_config(name))
    if "text_cfg" in config:
        config["text_cfg"] = resolve_text_cfg(config["text_cfg"])
    return config


def init_caption_projection(model: nn.Module) -> None:
    """Initialise a fresh CoCa decoder's output projection, which open_clip 3.3.0 leaves as
    ``torch.empty`` (open_clip issue #554): zeros or leftover memory would give constant caption
    logits and no caption gradient to the towers. Normal with std width^-1/2, as open_clip
    initialises its other projections. No-op for models without a captioning decoder."""
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if isinstance(projection, nn.Parameter):
        with torch.no_grad():
            projection.normal_(std=projection.shape[0] ** -0.5)


def create_model(
    name_or_config: str,
    pretrained: str | None = None,
    *,
    lock_image: bool = False,
    lock_text: bool = False,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    model_kwargs: dict[str, Any] | None = None,
    patch_dropout: float = 0.0,
) -> tuple[nn.Module, Callable[..., torch.Tensor], Callable[..., torch.Tensor], Any]:
    """Build ``(model, preprocess_train, preprocess_val, tokenizer)`` from an open_clip name.

    The model returns a dict (``image_features``, ``text_features``, ``logit_scale`` = s, and
    ``logit_bias`` for SigLIP models), the contract every objective relies on. ``pretrained`` is
    an open_clip tag (needs a network once) or a local weights file (works offline).
    ``tokenizer`` is a local SentencePiece ``.model`` file (or a packaged one, e.g.
    ``vlp:procedural-bpe``) replacing open_clip's tokenizer.
    ``model_kwargs`` override the model config (an objective's needs, e.g. SigLIP's
    ``init_logit_bias``); record them with the config (``model_config(...) | model_kwargs``).
    A ``text_cfg`` there replaces the config's whole ``text_cfg`` (open_clip's rule).
    ``patch_dropout`` > 0 sets a ViT image tower's ``vision_cfg.patch_dropout`` (FLIP, applied in
    training only); a ValueError for any other tower. It is a training setting: record the model
    config without it.

    A Hugging Face text tower (``text_cfg.hf_model_name``: a folder, a hub name or a ``vlp:``
    alias) is built from its resolved folder, checked first (:class:`HFTowerError`, one line,
    when it does not load), and comes with its own tokenizer (open_clip's ``HFTokenizer``).
    """
    name = resolve_model_name(name_or_config)
    if pretrained:
        check_pretrained(name, pretrained)
    model_kwargs = dict(model_kwargs or {})
    text_cfg = model_kwargs.get("text_cfg") or (
        {} if name.startswith("hf-hub:") else model_config(name).get("text_cfg", {})
    )
    hf_tower = text_cfg.get("hf_model_name")
    schema = ":" in name  # a local-dir:/hf-hub: config is open_clip's, with its own weights
    if hf_tower:
        text_cfg = resolve_text_cfg(text_cfg)
        if not schema or "text_cfg" in model_kwargs:
            # open_clip skips the tower's own weights when a full checkpoint replaces them; a
            # text_cfg passed as a keyword escapes that rule, so it is applied here.
            load_tower = bool(text_cfg.get("hf_model_pretrained", True))
            load_tower = load_tower and not (pretrained or schema)
            model_kwargs["text_cfg"] = {**text_cfg, "hf_model_pretrained": load_tower}
        check_hf_tower(text_cfg["hf_model_name"], weights=not (pretrained or schema))
    try:
        with _quiet_random_init(not pretrained), quiet_hf_loading():
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=device, output_dict=True,
                force_patch_dropout=patch_dropout or None, **model_kwargs,
            )  # fmt: skip
    except pickle.UnpicklingError as error:  # open_clip loads with torch.load(weights_only=True)
        raise PretrainedError(refused_pickle(pretrained or name, error)) from None
    except OSError as error:  # transformers' "cannot load": missing files, hub unreachable
        if not hf_tower:
            raise
        why = str(error).strip().splitlines()[0]
        raise HFTowerError(
            f"text_cfg.hf_model_name '{text_cfg['hf_model_name']}' does not load: {why}"
        ) from None
    if patch_dropout:
        check_patch_dropout(model, patch_dropout)
    if not (pretrained or schema):
        init_caption_projection(model)
    if lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if tokenizer is None and hf_tower and not schema:
        return model, preprocess_train, preprocess_val, hf_tokenizer(text_cfg)
    if tokenizer is None:
        return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)
    sentencepiece = sentencepiece_tokenizer(tokenizer, model_config(name) | model_kwargs)
    return model, preprocess_train, preprocess_val, sentencepiece


def check_patch_dropout(model: nn.Module, patch_dropout: float) -> None:
    """Raise ValueError unless ``model``'s image tower drops patches (open_clip's ViT): other
    towers (ResNets, timm) ignore ``vision_cfg.patch_dropout`` and would train at full cost."""
    visual = getattr(model, "visual", None)
    if not isinstance(getattr(visual, "patch_dropout", None), PatchDropout):
        raise ValueError(
            f"model.patch_dropout={patch_dropout} drops the patch tokens of open_clip's ViT image "
            f"tower; this model's image tower is {type(visual).__name__}: set model.patch_dropout=0"
        )


def check_pretrained(name: str, pretrained: str) -> None:
    """Raise :class:`PretrainedError` now, not after a minute of download retries, when
    ``pretrained`` is neither a local weights file nor an open_clip tag of ``name`` that is cached
    or downloadable (``HF_HUB_OFFLINE=1`` or an unreachable hub make a download impossible)."""
    if Path(pretrained).is_file() or ":" in name:  # hf-hub:/local-dir: bring their own weights
        return
    if os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        raise PretrainedError(f"weights file '{pretrained}' does not exist")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise PretrainedError(
            f"'{pretrained}' is neither a weights file nor a pretrained tag of model '{name}' "
            f"(its tags: {', '.join(tags) or 'none'})"
        )
    if "file" in cfg or not cfg.get("hf_hub") or _hub_weights_cached(cfg["hf_hub"]):
        return
    if _hub_offline():
        why = "HF_HUB_OFFLINE=1 is set"
    elif not _hub_reachable():
        why = f"{huggingface_hub.constants.ENDPOINT} cannot be reached"
    else:
        return
    raise PretrainedError(
        f"pretrained weights '{pretrained}' of model '{name}' are not in the local Hugging Face "
        f"cache and {why}; download them once with network access, or give a weights file path"
    )


def _hub_weights_cached(hf_hub: str) -> bool:
    """Whether open_clip would find the weights of an ``org/repo/[file]`` entry in the cache."""
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or open_clip_pretrained.HF_WEIGHTS_NAME
    names = [*open_clip_pretrained._get_safe_alternatives(filename), filename]
    return any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, n), str) for n in names)


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "initialized partially" not in message


@contextmanager
def _quiet_random_init(quiet: bool) -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning during
    one model build that asked for no weights (a from-scratch run is random by design), and its
    "initialized partially" (a pretrained HF text tower in an otherwise new model, by design)."""
    if not quiet:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)  # open_clip logs through the root logger
    try:
        yield
    finally:
        root.removeFilter(drop)


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing (size, mean/std, resize mode) that belongs with the model's weights."""
    return dict(open_clip.get_model_preprocess_cfg(model))
