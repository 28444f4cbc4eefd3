"""`vlp export`: write a run's model in open_clip's hub layout, loadable as ``local-dir:OUT``.

The layout is what ``open_clip.push_to_hf_hub`` uploads and what open_clip's ``local-dir:``
and ``hf-hub:`` loaders read:

- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ..., "vlp": {...}}``; the
  preprocessing is the one stored with the weights, and ``vlp`` records where the weights came
  from and which tokenizer goes with them (open_clip ignores the block);
- ``open_clip_model.safetensors``: the open_clip state dict (no pickle);
- ``heads.safetensors``, for objectives with heads (ConVIRT's projections): the heads' state
  dict, with the objective and its settings in the config's ``vlp`` block; open_clip ignores
  it, ``vlp eval`` applies the heads;
- for a model whose text embeddings are pooled otherwise than open_clip does (PyramidCLIP's
  ``text_pool=max``), the objective and its settings in the ``vlp`` block too: ``vlp eval``
  pools as in training, open_clip loading the folder alone pools the end-of-text token;
- ``README.md``: a model card (:mod:`evals.model_card`): the run's config highlights, steps and
  samples seen, the eval results in the run's ``results/``, and how to load the folder;
- tokenizer files when the tokenizer is not open_clip's bundled BPE: a Hugging Face tokenizer
  is saved next to the weights (open_clip loads it from there); a SentencePiece ``.model`` is
  copied as ``sentencepiece.model`` (vlp loads it; open_clip cannot, and the export says so).

Example::

    export_run("runs/demo", "exports/demo")
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exports/demo")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal, get_args

from safetensors.torch import save_file

from evals.loading import CONFIG_NAME, LoadedModel, load_model
from evals.model_card import CARD_NAME, model_card
from vlp.atomic_files import atomic_path
from vlp.models.vlp_model import HEADS_FILE, VlpModel

WEIGHTS_NAME = "open_clip_model.safetensors"
SENTENCEPIECE_NAME = "sentencepiece.model"

logger = logging.getLogger(__name__)


def _save_tokenizer(tokenizer: Any, tokenizer_file: Path | None, folder: Path) -> dict[str, str]:
    """Write what open_clip (or vlp) needs to rebuild the tokenizer; describe it for the config."""
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / SENTENCEPIECE_NAME)
        logger.warning(
            "the model uses a SentencePiece tokenizer (%s): vlp loads the export with it, but "
            "open_clip's local-dir loader does not know it and would use its default tokenizer",
            tokenizer_file,
        )
        return {"tokenizer": "sentencepiece", "tokenizer_file": SENTENCEPIECE_NAME}
    if hasattr(tokenizer, "save_pretrained"):  # open_clip's HFTokenizer / SigLipTokenizer
        tokenizer.save_pretrained(str(folder))
    return {"tokenizer": type(tokenizer).__name__}


def _cpu_state(module: Any) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _run_objective(checkpoint: str) -> dict[str, Any]:
    """The objective block (name, settings) recorded in a checkpoint's ``model_config.json``."""
    meta = json.loads((Path(checkpoint) / "model_config.json").read_text())
    return dict(meta["objective"])


ExportFormat = Literal["open_clip", "transformers"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)


def _write_open_clip(loaded: LoadedModel, staging: Path, target: Path) -> None:
    """open_clip's hub layout (the module docstring) into the empty folder ``staging``."""
    model, _, tokenizer, info = loaded
    clip = model.clip if isinstance(model, VlpModel) else model
    save_file(_cpu_state(clip), str(staging / WEIGHTS_NAME))
    tokenizer_block = _save_tokenizer(tokenizer, info.tokenizer_file, staging)
    vlp_block: dict[str, Any] = {
        "model_name": info.name,
        "exported_from": info.pretrained,
        **tokenizer_block,
    }
    if isinstance(model, VlpModel) and len(model.heads):  # open_clip ignores this file
        save_file(_cpu_state(model.heads), str(staging / HEADS_FILE))
    if isinstance(model, VlpModel) and (len(model.heads) or model.text_pool != "eot"):
        vlp_block["objective"] = _run_objective(info.pretrained)  # rebuilds heads, text pooling
    config = {
        "model_cfg": info.model_cfg,
        "preprocess_cfg": info.preprocess_cfg,
        "vlp": vlp_block,
    }
    (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    heads = isinstance(model, VlpModel) and len(model.heads) > 0
    text_pool = model.text_pool if isinstance(model, VlpModel) else "eot"
    card = model_card(info, str(target), tokenizer_block, heads=heads, text_pool=text_pool)
    (staging / CARD_NAME).write_text(card)


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    format: ExportFormat = "open_clip",
) -> Path:
    """Export the newest complete checkpoint of ``run_dir`` (or any model reference that
    :func:`evals.loading.load_model` accepts) to ``out``; return ``out``.

    ``format="open_clip"`` writes open_clip's hub layout (the module docstring);
    ``format="transformers"`` writes a transformers ``CLIPModel`` folder
    (:mod:`evals.export_transformers`). Both get a model card, ``README.md``, that says how to
    load the folder and how to export the other format. The export is assembled in a temporary sibling
    folder and renamed into place (:func:`vlp.atomic_files.atomic_path`), so ``out`` is never
    half written; its files get the modes a plain ``cp`` would give (0644 files, 0755 folders,
    less the umask: safetensors writes 0600), since an export is meant to be shared (another
    user, a web server, the hub uploader). ``out`` must not exist, or be empty, unless
    ``overwrite``.

    Raises:
        evals.loading.ModelLoadError: ``run_dir`` is not a model.
        FileExistsError: ``out`` exists, is not empty and ``overwrite`` is False.
        evals.export_transformers.UnmappableModelError: ``format="transformers"`` and the model
            does not map to ``CLIPModel``.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {EXPORT_FORMATS}")
    target = Path(out)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(
            f"export folder '{target}' exists and is not empty; pass --overwrite "
            "(overwrite=True in Python) to replace it"
        )
    loaded = load_model(run_dir)
    if format == "transformers":
        from evals.export_transformers import check_mappable, write_transformers

        check_mappable(loaded)  # before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as staging:
        staging.mkdir()
        if format == "transformers":
            write_transformers(loaded, staging)
            tokenizer = {"tokenizer": type(loaded[2]).__name__}
            card = model_card(loaded[3], str(target), tokenizer, export_format="transformers")
            (staging / CARD_NAME).write_text(card)
        else:
            _write_open_clip(loaded, staging, target)
        if target.exists():  # last, so a failed export leaves the old one
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return target
