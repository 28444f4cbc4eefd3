"""Plain float64 references of the contrastive losses, written as the papers state them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_reference(z, w, s, weights=(0.5, 0.5), alpha=0.0):
    """Full-batch symmetric InfoNCE with PyramidCLIP-softened targets, written plainly."""
    logits = s * z @ w.T
    n = logits.shape[0]
    target = torch.full_like(logits, alpha / (n - 1) if n > 1 else 0.0)
    target.fill_diagonal_(1.0 - alpha)
    i2t = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -(target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return weights[0] * i2t + weights[1] * t2i


def sigmoid_reference(z, w, s, bias):
    """Full-batch SigLIP loss: −(1/B) Σ_ij log σ(z_ij (s·x_i·y_j + β)), z = 2·I − 1."""
    labels = 2 * torch.eye(z.shape[0], dtype=z.dtype) - 1
    return -F.logsigmoid(labels * (s * z @ w.T + bias)).sum() / z.shape[0]


def unit_features(n, d=12, seed=0, dtype=torch.float64):
    """Two sets of ``n`` random L2-normalised ``d``-vectors."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return z.to(dtype), w.to(dtype)
