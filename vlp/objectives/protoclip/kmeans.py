"""K-means for ProtoCLIP's episodic prototypes (Chen et al., "Prototypical Contrastive Language
Image Pretraining", arXiv 2206.10996, the method section's online episodic training; official
code megvii-research/protoclip, ``src/training/clustering.py``).

What the official code does, and this module follows: once per episode the whole episode's
L2-normalised 128-d projections of one modality are clustered with ``faiss.Kmeans`` (K = 20000,
20 iterations, 3 restarts keeping the lowest objective, Euclidean: ``spherical=False``, so the
centroids are plain means and are NOT re-normalised), and each sample's label is its nearest
final centroid (``index.search``). NaN features are zeroed there; here they are an error.

Two backends give that clustering:

- ``faiss``: ``faiss.Kmeans`` with the official settings (faiss' defaults otherwise: random
  initialisation, at most 256 points per centroid sampled for training, empty clusters split
  from large ones). Runs on the CPU (faiss-cpu); the result is moved to the features' device.
- ``torch``: the same objective written in torch, on the features' device. k-means++
  initialisation (Arthur & Vassilvitskii 2007) from a ``torch.Generator`` seeded with
  ``seed + restart``, Lloyd iterations, an empty cluster re-seeded with the point farthest from
  its centroid, the restart with the lowest inertia kept. Distances are computed in chunks of
  ``chunk_size`` rows, so the extra memory is O(chunk_size·k), not O(n·k). Deterministic for a
  fixed seed on the CPU; on CUDA ``index_add_`` accumulates atomically, so bitwise determinism
  there needs ``torch.use_deterministic_algorithms(True)``.

``backend="auto"`` is faiss when it imports (a dev dependency, pinned in requirements.txt) and
torch otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "faiss"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "faiss")


@dataclass(frozen=True)
class KMeansResult:
    """One clustering of ``n`` points into ``k`` clusters.

    Attributes:
        labels: ``long [n]``, each point's nearest final centroid.
        centroids: ``[k, d]`` cluster means, float32 (torch backend: float64 for float64 input).
        inertia: Σ_i ‖x_i − c_{labels_i}‖², the objective the restarts are compared on.
    """

    labels: Tensor
    centroids: Tensor
    inertia: float


def kmeans(
    features: Tensor,
    k: int,
    *,
    iterations: int = 20,
    restarts: int = 3,
    seed: int = 0,
    backend: Backend = "auto",
    chunk_size: int = 4096,
) -> KMeansResult:
    """Euclidean k-means of ``features [n, d]`` into ``k`` clusters, as ProtoCLIP's official code
    clusters each episode (see the module docstring for what each backend does).

    Args:
        features: ``[n, d]`` points (ProtoCLIP: L2-normalised projections; not re-normalised).
        k: number of clusters, ``1 <= k <= n``.
        iterations: Lloyd iterations per restart (the official 20).
        restarts: independent initialisations; the lowest inertia wins (the official 3).
        seed: restart ``r`` draws from a generator seeded with ``seed + r`` (faiss: its seed).
        backend: ``torch``, ``faiss`` or ``auto`` (faiss when importable).
        chunk_size: rows per distance block of the torch backend (memory O(chunk_size·k)).

    Example:
        >>> result = kmeans(torch.nn.functional.normalize(torch.randn(1000, 128), dim=1), 10)
        >>> result.labels.shape, result.centroids.shape
        (torch.Size([1000]), torch.Size([10, 128]))
    """
    _check_arguments(features, k, iterations, restarts, backend, chunk_size)
    faiss = _import_faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise ImportError("kmeans: backend='faiss' needs faiss: pip install -r requirements.txt")
    if faiss is not None:
        return _faiss_kmeans(faiss, features, k, iterations, restarts, seed)
    x = features.detach().to(torch.float64 if features.dtype == torch.float64 else torch.float32)
    best: KMeansResult | None = None
    for restart in range(restarts):
        generator = torch.Generator(device=x.device).manual_seed(seed + restart)
        result = _lloyd(x, _kmeans_plus_plus(x, k, generator), iterations, chunk_size)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None  # restarts >= 1
    return best


def nearest_centroids(features: Tensor, centroids: Tensor, chunk_size: int = 4096) -> Tensor:
    """``long [n]``: each row's nearest centroid (Euclidean), as k-means labels its points; for
    episodes that reuse an earlier clustering (``objective.protoclip.cluster_every``)."""
    x = features.detach().to(centroids.dtype)
    return _assign(x, centroids.to(x.device), chunk_size)[0]


def _check_arguments(
    features: Tensor, k: int, iterations: int, restarts: int, backend: str, chunk_size: int
) -> None:
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(
            f"kmeans: features must be a floating [n, d] tensor, got {features.dtype} "
            f"{tuple(features.shape)}"
        )
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k must be in [1, n={n}], got {k}")
    if iterations < 1 or restarts < 1 or chunk_size < 1:
        raise ValueError(
            f"kmeans: iterations, restarts and chunk_size must be >= 1, got {iterations}, "
            f"{restarts}, {chunk_size}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"kmeans: backend must be one of {BACKENDS}, got '{backend}'")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("kmeans: features hold NaN or inf (a diverged model?); clean them first")


def _import_faiss() -> ModuleType | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_kmeans(
    faiss: ModuleType, features: Tensor, k: int, iterations: int, restarts: int, seed: int
) -> KMeansResult:
    """The official call: ``faiss.Kmeans(d, k, niter, nredo)``, not spherical, labels by a
    nearest-centroid search of the trained index. ``min_points_per_centroid=1`` only silences
    faiss's warning below 39 points per centroid (a small episode's normal case); the default
    subsampling above 256 points per centroid is kept, as the official code has it."""
    x = features.detach().to("cpu", torch.float32).contiguous().numpy()
    model = faiss.Kmeans(
        x.shape[1], k, niter=iterations, nredo=restarts, seed=seed, spherical=False,
        min_points_per_centroid=1,
    )  # fmt: skip
    model.train(x)
    _, labels = model.index.search(x, 1)
    result_labels = torch.from_numpy(labels.reshape(-1)).to(features.device, torch.long)
    centroids = torch.from_numpy(model.centroids).to(features.device)
    inertia = _inertia(features.detach().float(), centroids, result_labels)
    return KMeansResult(result_labels, centroids, inertia)


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centroid is a point drawn with probability ∝ its squared
    distance to the nearest centroid so far (uniformly once every point is a centroid)."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids = x.new_empty(k, x.shape[1])
    centroids[0] = x[first[0]]
    nearest = (x - centroids[0]).pow(2).sum(1)
    for j in range(1, k):
        # torch.where keeps the choice on the device (no host sync per centroid)
        weights = torch.where(nearest.sum() > 0, nearest, torch.ones_like(nearest))
        pick = torch.multinomial(weights, 1, generator=generator)
        centroids[j] = x[pick[0]]
        nearest = torch.minimum(nearest, (x - centroids[j]).pow(2).sum(1))
    return centroids


def _assign(x: Tensor, centroids: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid and squared distance of every row, ‖x‖² − 2x·c + ‖c‖² per block of
    ``chunk_size`` rows (clamped at 0 against rounding)."""
    centroid_sq = centroids.pow(2).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    distances = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        block = x[start : start + chunk_size]
        sq = block.pow(2).sum(1, keepdim=True) - 2 * block @ centroids.T + centroid_sq
        best, index = sq.min(dim=1)
        labels[start : start + chunk_size] = index
        distances[start : start + chunk_size] = best.clamp_min(0)
    return labels, distances


def _lloyd(x: Tensor, centroids: Tensor, iterations: int, chunk_size: int) -> KMeansResult:
    """Lloyd's iterations from ``centroids``; stops early at a fixed point (same labels, no
    empty cluster: the next update would reproduce the same centroids)."""
    k = centroids.shape[0]
    previous: Tensor | None = None
    for _ in range(iterations):
        labels, distances = _assign(x, centroids, chunk_size)
        counts = torch.bincount(labels, minlength=k)
        empty = counts == 0
        any_empty = bool(empty.any())
        if previous is not None and not any_empty and torch.equal(labels, previous):
            break
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        if any_empty:
            # farthest points first; the stable sort makes ties (duplicates) deterministic
            order = torch.sort(distances, descending=True, stable=True).indices
            centroids[empty] = x[order[: int(empty.sum())]]
        previous = labels
    labels, _ = _assign(x, centroids, chunk_size)
    return KMeansResult(labels, centroids, _inertia(x, centroids, labels))


def _inertia(x: Tensor, centroids: Tensor, labels: Tensor) -> float:
    """Σ‖x_i − c_{labels_i}‖² from the differences: the ‖x‖² − 2x·c + ‖c‖² of the assignment
    loses the small distances of tight clusters to cancellation in float32."""
    return float((x - centroids[labels]).pow(2).sum(dtype=torch.float64))
