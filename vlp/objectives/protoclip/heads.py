"""ProtoCLIP's projection heads and its weight-decay exclusions (Chen et al., "Prototypical
Contrastive Language Image Pretraining", arXiv 2206.10996, the method section's projection
heads and the implementation details; official code megvii-research/protoclip,
``src/open_clip/model.py`` ``*_projection_head`` and ``src/training/main.py``).

The prototype terms are computed on a low-dimensional projection of each tower's embedding
(before normalisation), not on the embedding itself, so clustering and prototype discrimination
act in a space of their own while the CLIP loss keeps using the un-projected features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# LayerNorm/GroupNorm as well as BatchNorm: vlp's towers name their norms freely ("norm1",
# "ln_final"), so norms are recognised by type rather than by the official "bn"/"ln" substrings.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class ProjectionHead(nn.Module):
    """Linear(in_dim→hidden) → BatchNorm1d → ReLU → Linear(hidden→out_dim), L2-normalised:
    the official head (``projection_n_layers=1``), one per tower, parameters not shared.

    Shapes: ``[b, in_dim] -> [b, out_dim]`` with unit rows. In training mode BatchNorm needs
    b > 1 and uses batch statistics (so it is not GradCache-exact, docs/architecture.md §2.3).

    Example:
        >>> head = ProjectionHead(512)
        >>> head(torch.randn(4, 512)).norm(dim=1)  # doctest: +SKIP
        tensor([1.0000, 1.0000, 1.0000, 1.0000], grad_fn=...)
    """

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 128):
        super().__init__()
        if min(in_dim, hidden, out_dim) < 1:
            raise ValueError(
                f"ProjectionHead: in_dim, hidden and out_dim must be >= 1, got "
                f"{in_dim}, {hidden}, {out_dim}"
            )
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``[b, in_dim]`` embeddings to unit ``[b, out_dim]`` vectors."""
        return F.normalize(self.net(features), dim=-1)


def no_decay_parameter_names(module: nn.Module) -> set[str]:
    """Names (as ``module.named_parameters()`` gives them) of the parameters that ProtoCLIP's
    AdamW does not decay: every parameter of a :class:`ProjectionHead`, of a BatchNorm,
    LayerNorm or GroupNorm, and every parameter with fewer than 2 dimensions (biases, gains,
    the logit and prototype scales). The official rule is ``p.ndim < 2`` or a name containing
    ``bn``, ``ln``, ``bias``, ``logit_scale`` or ``projection_head``.

    Call it on the model the optimizer is built from (vlp: the unwrapped ``VlpModel``, before
    ``accelerator.prepare``), so the names match ``vlp.training.optim.parameter_groups``' loop
    over ``model.named_parameters()``: a parameter decays iff its name is not in this set.
    """
    excluded: set[str] = set()
    for prefix, child in module.named_modules():
        if isinstance(child, (ProjectionHead, *_NORMS)):
            dot = f"{prefix}." if prefix else ""
            excluded.update(dot + name for name, _ in child.named_parameters())
    excluded.update(name for name, param in module.named_parameters() if param.ndim < 2)
    return excluded
