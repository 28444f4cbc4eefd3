"""Zero-shot image-text retrieval with CLIP_benchmark's recall@k, computed in row chunks.

Captions are flattened and each is mapped to its image (``texts_image_index``).
``image_retrieval_recall@k``: per text query, 1 if its image is among the top-k images, averaged
over texts. ``text_retrieval_recall@k``: per image query, 1 if any of its captions is among the
top-k texts, averaged over images. The score matrix is never built whole: rows are scored
``chunk_size`` at a time, so memory is O(chunk_size x N + embeddings) and a million pairs fit.

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


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    texts_image_index: Tensor | Sequence[int],
    recall_k: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Return CLIP_benchmark's retrieval recalls plus mean/median ranks, as Python floats.

    ``image_features`` [N_img, d] and ``text_features`` [N_txt, d] must already be normalised;
    the score is their dot product, computed on ``image_features``' device (float16/bfloat16
    promoted to float32). Keys, for each k in order: ``image_retrieval_recall@{k}``,
    ``text_retrieval_recall@{k}``; then ``image_retrieval_mean_rank``/``_median_rank`` and
    ``text_retrieval_mean_rank``/``_median_rank``.

    Ties: top-k is ``torch.topk`` on each query's scores, as CLIP_benchmark does, so among tied
    scores which ones make the cut is torch's choice; whether near-equal float scores tie at all
    can depend on the matmul's shape and device (chunk size here, device in CB). A k larger than the candidate count is
    clamped to it (CB would raise). A rank is 1 + the number of candidates scoring strictly above
    the best positive (optimistic under ties). An image without captions counts as a miss in
    ``text_retrieval_recall@k`` (as in CB) and is left out of the text-retrieval ranks.
    """
    device = image_features.device
    index = torch.as_tensor(texts_image_index, dtype=torch.long, device=device)
    _check_inputs(image_features, text_features, index, recall_k)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    images = image_features.to(dtype)
    texts = text_features.to(device=device, dtype=dtype)
    n_img, n_txt = images.shape[0], texts.shape[0]
    ks = [int(k) for k in recall_k]

    image_hits = dict.fromkeys(ks, 0)
    image_ranks: list[Tensor] = []
    for rows in slices(n_txt, chunk_size):  # text queries against all images
        scores = texts[rows] @ images.T
        own = index[rows, None]
        for k in ks:
            top = scores.topk(min(k, n_img), dim=1).indices
            image_hits[k] += int((top == own).any(dim=1).sum())
        positive = scores.gather(1, own)
        image_ranks.append((scores > positive).sum(dim=1) + 1)

    text_hits = dict.fromkeys(ks, 0)
    text_ranks: list[Tensor] = []
    for rows in slices(n_img, chunk_size):  # image queries against all captions
        scores = images[rows] @ texts.T
        own = torch.arange(rows.start, rows.stop, device=device)[:, None]
        for k in ks:
            top = scores.topk(min(k, n_txt), dim=1).indices
            text_hits[k] += int((index[top] == own).any(dim=1).sum())
        is_positive = index[None, :] == own
        best = scores.masked_fill(~is_positive, float("-inf")).amax(dim=1, keepdim=True)
        has_caption = is_positive.any(dim=1)
        text_ranks.append(((scores > best).sum(dim=1) + 1)[has_caption])

    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = image_hits[k] / n_txt
        metrics[f"text_retrieval_recall@{k}"] = text_hits[k] / n_img
    for name, ranks in (("image", image_ranks), ("text", text_ranks)):
        mean, median = _rank_summary(torch.cat(ranks).cpu())
        metrics[f"{name}_retrieval_mean_rank"] = mean
        metrics[f"{name}_retrieval_median_rank"] = median
    return metrics


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
    flat = [caption for per_image in captions for caption in per_image]
    owners = [i for i, per_image in enumerate(captions) for _ in per_image]
    with inference(model):
        image_features = encode_batches(
            encoder(model, "encode_image"), batches, run_device, amp_dtype, "cpu"
        )
        token_batches = (tokenizer(flat[s]) for s in slices(len(flat), batch_size))
        text_features = encode_batches(
            encoder(model, "encode_text"), token_batches, run_device, amp_dtype, "cpu"
        )
    if image_features.shape[0] != len(captions):
        raise ValueError(
            f"got {image_features.shape[0]} images but {len(captions)} caption lists: "
            "give one caption list per image, in the same order"
        )
    return image_features, text_features, torch.tensor(owners, dtype=torch.long)
