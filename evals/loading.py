"""Turn a model reference into (model, preprocess, tokenizer, info), whatever kind it is.

A reference is one of:

- a vlp **run directory** (``RUN/checkpoints/step_*``): its newest complete checkpoint;
- a vlp **checkpoint directory** (``model.safetensors`` + ``model_config.json``);
- an **export directory** in open_clip's hub layout (``open_clip_config.json`` + weights), as
  written by :func:`evals.export.export_model`;
- an **open_clip model name** (built-in, vlp's ``vlp-tiny-vit``, a model-config JSON,
  ``local-dir:``/``hf-hub:``) with an optional ``pretrained`` tag or weights file.

Checkpoints are built exactly like exports, through open_clip's ``local-dir:`` loader on a
temporary view of the checkpoint (its config and a link to its weights): the preprocessing
stored with the weights (size, mean/std, resize mode) is the one used (docs/architecture.md §6),
and an export evaluates exactly like the checkpoint it came from. A path that is none of these
raises :class:`ModelLoadError` naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from evals._model import Tokenizer
from vlp.run_folder import checkpoints_dir, list_checkpoints

CONFIG_NAME = "open_clip_config.json"
"""open_clip's hub config: ``{"model_cfg": ..., "preprocess_cfg": ...}`` (plus our ``vlp`` block)."""
CHECKPOINT_FILES = ("model.safetensors", "model_config.json")

ModelKind = Literal["run", "checkpoint", "export", "open_clip"]


class ModelLoadError(ValueError):
    """A model reference that cannot be loaded; the message names it and what was expected."""


@dataclass
class ModelInfo:
    """Where a model came from and how to name it in results.

    ``name`` and ``pretrained`` are what CLIP_benchmark-shaped results record as ``model`` and
    ``pretrained``: the architecture and the weights (a checkpoint path, an export path, a tag).
    """

    kind: ModelKind
    name: str
    pretrained: str
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    tokenizer_file: Path | None = None
    """A SentencePiece ``.model`` used instead of open_clip's tokenizer, if any."""


class LoadedModel(NamedTuple):
    """What every evaluator needs; unpacks as ``model, preprocess, tokenizer, info``."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Tokenizer
    info: ModelInfo


def newest_checkpoint(run_dir: str | os.PathLike[str]) -> Path:
    """The newest complete checkpoint of a run (one holding weights and their config).

    Raises ModelLoadError when the run has none yet.
    """
    complete = [
        path
        for path in list_checkpoints(checkpoints_dir(run_dir))
        if all((path / name).is_file() for name in CHECKPOINT_FILES)
    ]
    if not complete:
        raise ModelLoadError(
            f"run directory '{run_dir}' has no complete checkpoint yet "
            "(checkpoints/step_*/model.safetensors + model_config.json)"
        )
    return complete[-1]


def _kind_of(path: Path) -> ModelKind | None:
    if checkpoints_dir(path).is_dir():
        return "run"
    if all((path / name).is_file() for name in CHECKPOINT_FILES):
        return "checkpoint"
    if (path / CONFIG_NAME).is_file():
        return "export"
    return None


def _tokenizer(model_dir: Path, model_cfg: dict[str, Any], sentencepiece: Path | None) -> Tokenizer:
    """The tokenizer the model was trained with, as open_clip would pick it for ``model_dir``."""
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    if sentencepiece is not None:
        from vlp.models.tokenizers import sentencepiece_tokenizer

        if not sentencepiece.is_file():
            raise ModelLoadError(f"the model's SentencePiece tokenizer '{sentencepiece}' is gone")
        return sentencepiece_tokenizer(sentencepiece, model_cfg)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name and not (model_dir / "tokenizer_config.json").is_file():
        # A checkpoint keeps no tokenizer files: use the named one, as training did.
        return open_clip.tokenizer.HFTokenizer(
            hf_name,
            context_length=text_cfg.get("context_length", 77),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    return open_clip.get_tokenizer(f"local-dir:{model_dir}")


def _from_local_dir(
    model_dir: Path, sentencepiece: Path | None, source: Path
) -> tuple[nn.Module, Callable[..., torch.Tensor], Tokenizer]:
    """Model, preprocessing and tokenizer through open_clip's ``local-dir:`` loader.

    ``source`` names the model in errors (``model_dir`` may be a temporary view of it).
    """
    import open_clip
    from safetensors import SafetensorError

    from vlp.models.factory import refused_pickle

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused the file
        raise ModelLoadError(f"'{source}': {refused_pickle(str(source), error)}") from None
    except (RuntimeError, ValueError, OSError, TypeError, SafetensorError) as error:
        raise ModelLoadError(f"'{source}': open_clip cannot build the model: {error}") from None
    config = json.loads((model_dir / CONFIG_NAME).read_text())
    return (
        model,
        preprocess,
        _tokenizer(model_dir, config["model_cfg"], sentencepiece),
    )


def _load_checkpoint(checkpoint: Path, kind: ModelKind) -> LoadedModel:
    from vlp.models import preprocess_config
    from vlp.models.tokenizers import run_tokenizer_file

    try:
        meta = json.loads((checkpoint / "model_config.json").read_text())
        model_cfg, preprocess_cfg = meta["model_cfg"], meta["preprocess_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"'{checkpoint / 'model_config.json'}' is not a vlp model config "
            f"(needs model_cfg and preprocess_cfg): {error!r}"
        ) from None
    sentencepiece = run_tokenizer_file(checkpoint)
    with tempfile.TemporaryDirectory(prefix="vlp-checkpoint-") as view:
        # open_clip's local-dir loader, on a view of the checkpoint: config + link to weights.
        view_dir = Path(view)
        (view_dir / CONFIG_NAME).write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
        )
        (view_dir / "model.safetensors").symlink_to((checkpoint / "model.safetensors").resolve())
        model, preprocess, tokenizer = _from_local_dir(view_dir, sentencepiece, checkpoint)
    model = with_heads(model, checkpoint, meta.get("objective"))
    info = ModelInfo(
        kind=kind,
        name=str(meta.get("model_name", "vlp")),
        pretrained=str(checkpoint),
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_config(model),
        tokenizer_file=sentencepiece,
    )
    return LoadedModel(model, preprocess, tokenizer, info)


def with_heads(model: Any, directory: Path, objective: dict[str, Any] | None) -> Any:
    """``model`` as its objective trained it: wrapped with the objective's heads when
    ``directory`` holds ``heads.safetensors`` (ConVIRT's projections...) and with the objective's
    text pooling when its recorded settings say ``text_pool`` other than ``eot`` (PyramidCLIP's
    max over positions; a run recorded before the setting existed pooled the end-of-text
    token), so that embeddings for evaluation are the ones the objective trained."""
    from safetensors.torch import load_file

    from vlp.models.vlp_model import HEADS_FILE, VlpModel
    from vlp.objectives import objective_class

    heads_file = directory / HEADS_FILE
    settings = dict((objective or {}).get("settings", {}))
    text_pool = str(settings.get("text_pool", "eot"))
    if not heads_file.is_file() and text_pool == "eot":
        return model
    if not objective:
        raise ModelLoadError(f"'{heads_file}' has no objective recorded beside it to build them")
    heads = {}
    if heads_file.is_file():
        cls = objective_class(objective["name"])
        heads = cls.from_config(cls.Config(**settings)).heads(model)
    try:
        wrapped = VlpModel(model, heads, text_pool=text_pool)
        if heads_file.is_file():
            wrapped.heads.load_state_dict(load_file(str(heads_file)))
    except ValueError as error:  # a pooling this tower cannot do, heads of an older layout
        raise ModelLoadError(f"'{directory}': {error}") from None
    return wrapped


def _load_export(export_dir: Path) -> LoadedModel:
    from vlp.models import preprocess_config

    config = json.loads((export_dir / CONFIG_NAME).read_text())
    if "model_cfg" not in config:
        raise ModelLoadError(
            f"'{export_dir / CONFIG_NAME}' has no model_cfg: not an open_clip export"
        )
    vlp_block = config.get("vlp", {})
    sentencepiece = (
        export_dir / vlp_block["tokenizer_file"] if "tokenizer_file" in vlp_block else None
    )
    model, preprocess, tokenizer = _from_local_dir(export_dir, sentencepiece, export_dir)
    model = with_heads(model, export_dir, vlp_block.get("objective"))
    info = ModelInfo(
        kind="export",
        name=f"local-dir:{export_dir}",
        pretrained="none",
        model_cfg=config["model_cfg"],
        preprocess_cfg=preprocess_config(model),
        tokenizer_file=sentencepiece,
    )
    return LoadedModel(model, preprocess, tokenizer, info)


def _load_named(name: str, pretrained: str | None) -> LoadedModel:
    from vlp.models import create_model, model_config, preprocess_config

    try:
        model, _, preprocess, tokenizer = create_model(name, pretrained)
        model_cfg = model_config(name)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        raise ModelLoadError(
            f"cannot load model '{name}' (pretrained={pretrained}): {error}"
        ) from None
    info = ModelInfo(
        kind="open_clip",
        name=name,
        pretrained=pretrained or "none",
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_config(model),
    )
    return LoadedModel(model, preprocess, tokenizer, info)


def load_model(
    reference: str | os.PathLike[str],
    pretrained: str | None = None,
    *,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Load any model reference (see the module docstring) in eval mode on ``device``.

    ``pretrained`` (an open_clip tag or weights file) only applies to open_clip names; given
    with a run, checkpoint or export directory it is an error, because those carry their own
    weights.
    """
    text = os.fspath(reference)
    path = Path(text)
    if path.is_dir():
        kind = _kind_of(path)
        if kind is None:
            raise ModelLoadError(
                f"'{text}' is not a model: expected a vlp run directory (checkpoints/step_*), "
                "a checkpoint directory (model.safetensors + model_config.json) or an "
                f"open_clip export ({CONFIG_NAME})"
            )
        if pretrained not in (None, "", "none"):
            raise ModelLoadError(
                f"'{text}' is a {kind} directory with its own weights; drop pretrained={pretrained!r}"
            )
        if kind == "run":
            loaded = _load_checkpoint(newest_checkpoint(path), "run")
        elif kind == "checkpoint":
            loaded = _load_checkpoint(path, "checkpoint")
        else:
            loaded = _load_export(path)
    elif path.is_file() and not text.endswith(".json"):
        raise ModelLoadError(
            f"'{text}' is a file, not a model: give a run, checkpoint or export directory, or an "
            "open_clip model name with this file as pretrained"
        )
    elif ":" not in text and (os.sep in text or text.startswith(".")) and not path.exists():
        raise ModelLoadError(
            f"'{text}' is not a model: no such directory (expected a run, checkpoint or export "
            "directory, or an open_clip model name)"
        )
    else:
        loaded = _load_named(text, pretrained)
    loaded.model.to(device).eval()
    return loaded
