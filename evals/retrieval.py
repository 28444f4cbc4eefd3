"""Zero-shot image-text retrieval with CLIP_benchmark's recall@k, computed in row chunks.

Captions are flattened and each is mapped to its image (``texts_image_index``).
``image_retrieval_recall@k``: per text query, 1 if its image is among the top-k images, averaged
over texts. ``text_retrieval_recall@k``: per image query, 1 if any of its captions is among the
top-k texts, averaged over images. The score matrix is never built whole: rows are scored
``chunk_size`` at a time, so memory is O(chunk_size x N + embeddings); 200k images x 200k
captions fit in a few hundred MiB (``benchmarks/retrieval_scale.py``).

Example::

    img, txt, index = encode_retrieval_set(model, images, captions, tokenizer)
    metrics = retrieval_metrics(img, txt, index, recall_k=(1, 5, 10))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from evals._model import (
    Tokenizer,
    encode_batches,
    encoder,
    inference,
    model_device,
    slices,
)


def _rank_summary(ranks: Tensor) -> tuple[float, float]:
    """Mean and median (average of the two middle values when even) of 1-based ranks."""
    if ranks.numel() == 0:
        return float("nan"), float("nan")
    ordered = ranks.double().sort().values
    n = ordered.numel()
    return ordered.mean().item(), ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).item()


def _float32_ratio(hits: int, total: int) -> float:
    """``hits / total`` rounded as CLIP_benchmark's ``(recall > 0).float().mean()`` rounds it.

    Why float32: so that our recalls are CB's to the last bit (a float32 mean of 0/1 values is
    the float32 division of the exact count).
    """
    return (torch.tensor(float(hits)) / torch.tensor(float(total))).item()


def _check_inputs(
    image_features: Tensor, text_features: Tensor, index: Tensor, recall_k: Sequence[int]
) -> None:
    """Raise ValueError naming the first inconsistency among the retrieval inputs."""
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D, got image {tuple(image_features.shape)} "
            f"and text {tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"feature dims differ: image {image_features.shape[1]} vs text {text_features.shape[1]}"
        )
    if image_features.shape[0] == 0 or text_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if index.ndim != 1 or index.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"texts_image_index must have one entry per caption ({text_features.shape[0]}), "
            f"got shape {tuple(index.shape)}"
        )
    if index.min() < 0 or index.max() >= image_features.shape[0]:
        raise ValueError(
            f"texts_image_index must lie in [0, {image_features.shape[0]}), "
            f"got min {index.min().item()} max {index.max().item()}"
        )
    if len(recall_k) == 0 or any(int(k) <= 0 for k in recall_k):
        raise ValueError(f"recall_k must be non-empty positive integers, got {recall_k!r}")


_CHUNK_ELEMENTS = 1 << 25
"""Default chunk: about 2^25 float32 scores (128 MiB) per block, plus one buffer as large."""
_MAX_CANDIDATES = 1 << 24
"""Counts are float32 sums of 0/1 values, exact below 2^24 candidates."""


def _best_positive(scores: Tensor, keys: Tensor, order: Tensor, sorted_keys: Tensor) -> Tensor:
    """Each row's highest score among its positives (candidates with the row's key), or -inf.

    Read from ``scores`` itself, so it is the very float the comparisons see.
    """
    low = torch.searchsorted(sorted_keys, keys)
    counts = torch.searchsorted(sorted_keys, keys, right=True) - low
    rows = torch.repeat_interleave(torch.arange(len(keys), device=keys.device), counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    offsets = torch.arange(len(rows), device=keys.device) - first
    columns = order[torch.repeat_interleave(low, counts) + offsets]
    best = torch.full((len(keys),), float("-inf"), device=scores.device, dtype=scores.dtype)
    return best.scatter_reduce_(0, rows, scores[rows, columns], "amax")


def _query_pass(
    queries: Tensor,
    candidates: Tensor,
    query_keys: Tensor,
    candidate_keys: Tensor,
    ks: Sequence[int],
    chunk_size: int | None,
) -> tuple[dict[int, int], Tensor, Tensor]:
    """Rank the candidates of every query, ``chunk_size`` queries at a time.

    A candidate is a positive of a query when their keys are equal. Returns the top-k hit
    counts, each query's rank (1 + candidates scoring strictly above its best positive) and
    whether it has a positive at all.

    Hits are decided by counting, exactly: with ``above`` candidates strictly above the best
    positive b and ``at_least`` candidates >= b, the top k holds a positive when
    ``at_least <= k`` and holds none when ``above >= k``. Only rows whose ties at b straddle
    the k-th place are left, and for those ``torch.topk`` decides, as in CLIP_benchmark. Why:
    two comparison passes written into a float buffer and summed cost less than one topk per
    k (and summing a bool tensor is several times slower than summing floats).
    """
    n = candidates.shape[0]
    if n >= _MAX_CANDIDATES:
        raise ValueError(f"retrieval supports fewer than {_MAX_CANDIDATES} candidates, got {n}")
    rows_per_chunk = chunk_size or max(1, min(1024, _CHUNK_ELEMENTS // n))
    order = torch.argsort(candidate_keys, stable=True)
    sorted_keys = candidate_keys[order]
    hits = dict.fromkeys(ks, 0)
    ranks: list[Tensor] = []
    has_positive: list[Tensor] = []
    buffer = torch.empty(0, device=queries.device, dtype=queries.dtype)
    for rows in slices(queries.shape[0], rows_per_chunk):
        scores = queries[rows] @ candidates.T
        keys = query_keys[rows]
        best = _best_positive(scores, keys, order, sorted_keys)
        found = best > float("-inf")
        if buffer.shape != scores.shape:
            buffer = torch.empty_like(scores)
        at_least = torch.ge(scores, best[:, None], out=buffer).sum(dim=1)
        above = torch.gt(scores, best[:, None], out=buffer).sum(dim=1)
        for k in ks:
            k_used = min(k, n)
            hit = (at_least <= k_used) & found
            ambiguous = ((above < k_used) & ~hit & found).nonzero().flatten()
            if len(ambiguous):
                top = scores[ambiguous].topk(k_used, dim=1).indices
                hit[ambiguous] = (candidate_keys[top] == keys[ambiguous, None]).any(dim=1)
            hits[k] += int(hit.sum())
        ranks.append(above.long() + 1)
        has_positive.append(found)
        del scores  # else the next block is computed while this one is still alive
    return hits, torch.cat(ranks), torch.cat(has_positive)


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    texts_image_index: Tensor | Sequence[int],
    recall_k: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Return CLIP_benchmark's retrieval recalls plus mean/median ranks, as Python floats.

    ``image_features`` [N_img, d] and ``text_features`` [N_txt, d] must already be normalised;
    the score is their dot product, computed on ``image_features``' device (float16/bfloat16
    promoted to float32). Keys, for each k in order: ``image_retrieval_recall@{k}``,
    ``text_retrieval_recall@{k}``; then ``image_retrieval_mean_rank``/``_median_rank`` and
    ``text_retrieval_mean_rank``/``_median_rank``.

    Memory: scores are computed ``chunk_size`` queries at a time (default: as many as fit in
    2^25 scores, at most 1024), so the peak is two to three such blocks plus the features,
    never the N_txt x N_img matrix.

    Ties: recall@k is CLIP_benchmark's ``torch.topk`` criterion (see ``_query_pass``), so
    among tied scores at the k-th place which ones make the cut is torch's choice; whether
    near-equal float scores tie at all can depend on the matmul's shape and device (chunk size
    here, device in CB). A k larger than the candidate count is clamped to it (CB would raise).
    A rank is 1 + the number of candidates scoring strictly above the best positive
    (optimistic under ties). An image without captions counts as a miss in
    ``text_retrieval_recall@k`` (as in CB) and is left out of the text-retrieval ranks.
    """
    device = image_features.device
    index = torch.as_tensor(texts_image_index, dtype=torch.long, device=device)
    _check_inputs(image_features, text_features, index, recall_k)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    images = image_features.to(dtype)
    texts = text_features.to(device=device, dtype=dtype)
    ks = [int(k) for k in recall_k]
    image_ids = torch.arange(images.shape[0], device=device)

    image_hits, image_ranks, _ = _query_pass(texts, images, index, image_ids, ks, chunk_size)
    text_hits, text_ranks, has_caption = _query_pass(
        images, texts, image_ids, index, ks, chunk_size
    )

    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = _float32_ratio(image_hits[k], texts.shape[0])
        metrics[f"text_retrieval_recall@{k}"] = _float32_ratio(text_hits[k], images.shape[0])
    for name, ranks in (("image", image_ranks), ("text", text_ranks[has_caption])):
        mean, median = _rank_summary(ranks.cpu())
        metrics[f"{name}_retrieval_mean_rank"] = mean
        metrics[f"{name}_retrieval_median_rank"] = median
    return metrics


def encode_captions(
    model: nn.Module,
    captions: Sequence[Sequence[str]],
    tokenizer: Tokenizer,
    batch_size: int = 256,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Encode the captions of each image; return (text_features, texts_image_index).

    ``captions[i]`` lists the captions of image ``i``. They are flattened in order, as
    CLIP_benchmark does, and come back L2-normalised float32 on the CPU with the index [N_txt]
    of each caption's image.
    """
    if any(isinstance(c, str) for c in captions):
        raise ValueError("captions must be a list of caption lists, one list per image")
    flat = [caption for per_image in captions for caption in per_image]
    owners = [i for i, per_image in enumerate(captions) for _ in per_image]
    if not flat:
        raise ValueError("no captions to encode: retrieval needs at least one caption")
    run_device = model_device(model, device)
    with inference(model):
        token_batches = (tokenizer(flat[s]) for s in slices(len(flat), batch_size))
        text_features = encode_batches(
            encoder(model, "encode_text"), token_batches, run_device, amp_dtype, "cpu"
        )
    return text_features, torch.tensor(owners, dtype=torch.long)


def encode_retrieval_set(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    captions: Sequence[Sequence[str]],
    tokenizer: Tokenizer,
    batch_size: int = 256,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode images and their captions; return (image_features, text_features, texts_image_index).

    ``images``: one float tensor [N, 3, H, W] (split into ``batch_size`` batches) or an iterable
    of such batches, already preprocessed. ``captions[i]`` lists the captions of image ``i``.
    Features come back L2-normalised float32 on the CPU (large sets need not fit the device);
    ``texts_image_index`` [N_txt] maps each flattened caption to its image, as CLIP_benchmark.
    """
    run_device = model_device(model, device)
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"image tensor must be [N, 3, H, W], got {tuple(images.shape)}")
        batches: Iterable[Tensor] = [images[s] for s in slices(images.shape[0], batch_size)]
    else:
        batches = images
    if any(isinstance(c, str) for c in captions):
        raise ValueError("captions must be a list of caption lists, one list per image")
    with inference(model):
        image_features = encode_batches(
            encoder(model, "encode_image"), batches, run_device, amp_dtype, "cpu"
        )
    if image_features.shape[0] != len(captions):
        raise ValueError(
            f"got {image_features.shape[0]} images but {len(captions)} caption lists: "
            "give one caption list per image, in the same order"
        )
    text_features, index = encode_captions(
        model, captions, tokenizer, batch_size, device=run_device, amp_dtype=amp_dtype
    )
    return image_features, text_features, index
