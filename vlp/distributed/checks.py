"""Refuse bad features before any large collective, with the same verdict on every rank.

A rank whose batch or width differs from the others' would otherwise hang (or crash) inside a
point-to-point exchange; a NaN on one rank would silently poison every rank's loss. One all-gather
of three integers per call (b, d, a non-finite flag) lets every rank see every rank's shapes and
take the same branch.
"""

from __future__ import annotations

import torch

from vlp.distributed.collectives import ProcessGroup, all_gather


class NonFiniteFeaturesError(FloatingPointError):
    """Some rank passed a NaN or infinite feature; raised on every rank of the group."""


def check_features(
    image_features: torch.Tensor, text_features: torch.Tensor, group: ProcessGroup | None
) -> int:
    """Validate a pair of ``[b, d]`` feature sets across ``group``; returns the group's columns.

    Raises:
        ValueError: a set that is not 2-D, sets of different shapes, or ranks that disagree
            on b or d (the message lists every rank's shape).
        NonFiniteFeaturesError: a NaN/inf anywhere in the group.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be [b, d]; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    finite = bool(torch.isfinite(image_features).all() and torch.isfinite(text_features).all())
    mine = torch.tensor(
        [*image_features.shape, int(not finite)], dtype=torch.int64, device=image_features.device
    )
    ranks = [tuple(int(v) for v in t.tolist()) for t in all_gather(mine, group)]
    shapes = {(b, d) for b, d, _ in ranks}
    if len(shapes) > 1:
        listed = ", ".join(f"rank {r}: [{b}, {d}]" for r, (b, d, _) in enumerate(ranks))
        raise ValueError(
            f"contrastive features differ in shape across the ranks of the group ({listed}); "
            "every rank must pass the same per-rank batch and width"
        )
    bad = [r for r, (_, _, nonfinite) in enumerate(ranks) if nonfinite]
    if bad:
        raise NonFiniteFeaturesError(
            f"non-finite (NaN/inf) features on rank(s) {bad} of the group (of {len(ranks)})"
        )
    return ranks[0][0] * len(ranks)
