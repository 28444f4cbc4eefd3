"""The exact distributed symmetric InfoNCE loss (CLIP), with direction weights and soft targets.

Each rank scores its own b rows against the columns of its whole group (gathered with autograd),
in both directions: image rows against all texts, text rows against all images. The mean over
ranks of the returned value is exactly the full-batch loss, and with the gather's summed backward
plus DDP's gradient averaging the parameter gradients are exactly the full-batch ones.
Memory is O(b·M) per rank for M gathered columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.distributed.collectives import ProcessGroup, all_gather_with_grad, rank


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Mean cross-entropy with 1−α on the target column and α/(M−1) on each other column.

    This is PyramidCLIP's softening (the α spreads over the M−1 negatives actually seen), not
    torch's ``label_smoothing`` (α/M on every column, the positive included).
    """
    if smoothing == 0.0:
        return F.cross_entropy(logits, targets)
    log_probs = F.log_softmax(logits, dim=-1)
    columns = logits.shape[-1]
    off = smoothing / (columns - 1)
    positive = log_probs.gather(1, targets[:, None]).squeeze(1)
    per_row = (1.0 - smoothing - off) * positive + off * log_probs.sum(dim=-1)
    return -per_row.mean()


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    weights: tuple[float, float] = (0.5, 0.5),
    smoothing: float = 0.0,
    group: ProcessGroup | None = None,
    tile_size: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against all columns of ``group``.

    Args:
        image_features: ``[b, d]`` LOCAL image embeddings (L2-normalised), row i pairs with
            ``text_features[i]``. Every rank of the group must pass the same b.
        text_features: ``[b, d]`` LOCAL text embeddings.
        logit_scale: s, already exponentiated (as open_clip's ``ClipLoss`` takes it).
        weights: (λ, 1−λ) for image→text and text→image; CLIP ½/½, ConVIRT 0.75/0.25.
        smoothing: α; 1−α on the positive, α/(M−1) on each of the M−1 negatives.
        group: process group whose batch provides the negatives (None = all ranks).
        tile_size: reserved for the tiled computation; only None is supported in this version.

    Returns:
        The mean over this rank's b rows; the mean over ranks equals the full-batch loss.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        >>> w = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        >>> loss = contrastive_loss(z, w, torch.tensor(10.0))
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            "image_features and text_features must both be [b, d]; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if len(weights) != 2 or min(weights) < 0:
        raise ValueError(f"weights must be two non-negative numbers (λ, 1−λ), got {weights}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if tile_size is not None:
        raise NotImplementedError(
            "tile_size: the tiled (memory O(b·tile)) contrastive core is not built yet; "
            "pass tile_size=None"
        )
    rows = image_features.shape[0]
    all_images = all_gather_with_grad(image_features, group)
    all_texts = all_gather_with_grad(text_features, group)
    if smoothing > 0 and all_texts.shape[0] < 2:
        raise ValueError("smoothing needs at least 2 columns (one negative)")
    targets = torch.arange(rows, device=image_features.device) + rank(group) * rows
    image_to_text = soft_cross_entropy(
        logit_scale * image_features @ all_texts.T, targets, smoothing
    )
    text_to_image = soft_cross_entropy(
        logit_scale * text_features @ all_images.T, targets, smoothing
    )
    return weights[0] * image_to_text + weights[1] * text_to_image
