"""The distributed contrastive loss against a float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.ddp_helpers import run_on_ranks
from vlp.distributed import all_gather_with_grad, contrastive_loss


def reference_loss(z, w, s, weights=(0.5, 0.5), alpha=0.0):
    """Full-batch symmetric InfoNCE with PyramidCLIP-softened targets, written plainly."""
    logits = s * z @ w.T
    n = logits.shape[0]
    target = torch.full_like(logits, alpha / (n - 1) if n > 1 else 0.0)
    target.fill_diagonal_(1.0 - alpha)
    i2t = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -(target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return weights[0] * i2t + weights[1] * t2i


def _features(n, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return z, w


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.75, 0.25)])
@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_single_process_matches_reference(n, weights, alpha):
    z, w = _features(n)
    leaves = [t.clone().requires_grad_() for t in (z, w, torch.tensor(7.0, dtype=torch.float64))]
    ref_leaves = [t.clone().detach().requires_grad_() for t in leaves]
    ours = contrastive_loss(*leaves, weights=weights, smoothing=alpha)
    ref = reference_loss(*ref_leaves, weights=weights, alpha=alpha)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.backward()
    ref.backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_rejects_bad_arguments():
    z, w = _features(4)
    with pytest.raises(ValueError, match="smoothing"):
        contrastive_loss(z, w, 1.0, smoothing=1.0)
    with pytest.raises(ValueError, match="weights"):
        contrastive_loss(z, w, 1.0, weights=(-1.0, 2.0))
    with pytest.raises(ValueError, match=r"\[b, d\]"):
        contrastive_loss(z, w[:3], 1.0)


def _features_on_ranks(rank, world, n, weights, alpha):
    z, w = _features(n)
    rows = n // world
    z_local = z[rank * rows : (rank + 1) * rows].clone().requires_grad_()
    w_local = w[rank * rows : (rank + 1) * rows].clone().requires_grad_()
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(z_local, w_local, s, weights=weights, smoothing=alpha)
    loss.backward()
    return {"loss": loss.detach(), "z": z_local.grad, "w": w_local.grad, "s": s.grad}


@pytest.mark.slow
@pytest.mark.parametrize("weights,alpha", [((0.5, 0.5), 0.0), ((0.75, 0.25), 0.2)])
def test_two_ranks_equal_full_batch(weights, alpha):
    """Mean of per-rank losses = full-batch loss; feature grads (÷N, as DDP averages) match."""
    n, world = 8, 2
    results = run_on_ranks(_features_on_ranks, world, n, weights, alpha)
    z, w = (t.requires_grad_() for t in _features(n))
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    ref = reference_loss(z, w, s, weights, alpha)
    ref.backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), ref.detach())
    torch.testing.assert_close(torch.cat([r["z"] for r in results]) / world, z.grad)
    torch.testing.assert_close(torch.cat([r["w"] for r in results]) / world, w.grad)
    torch.testing.assert_close(torch.stack([r["s"] for r in results]).mean(), s.grad)


class TinyTowers(nn.Module):
    """Two linear 'towers' and a learned log-scale: the smallest CLIP-shaped model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, 4).double()
        self.text = nn.Linear(5, 4).double()
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x, y):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)


def _batch(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(
        n, 5, generator=g, dtype=torch.float64
    )


def _ddp_gradients(rank, world, n):
    model = nn.parallel.DistributedDataParallel(TinyTowers())
    x, y = _batch(n)
    rows = n // world
    z, w = model(x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows])
    loss = contrastive_loss(z, w, model.module.logit_scale.exp())
    loss.backward()
    assert all_gather_with_grad(torch.ones(1)).shape == (world,)
    grads = {k: p.grad.clone() for k, p in model.module.named_parameters()}
    del model
    return grads


@pytest.mark.slow
def test_ddp_parameter_gradients_equal_single_process():
    """DDP-averaged gradients equal the full-batch gradients (no 1/N bug, open_clip#616)."""
    n = 8
    grads = run_on_ranks(_ddp_gradients, 2, n)
    model = TinyTowers()
    z, w = model(*_batch(n))
    contrastive_loss(z, w, model.logit_scale.exp()).backward()
    for name, p in model.named_parameters():
        for rank_grads in grads:
            torch.testing.assert_close(rank_grads[name], p.grad, rtol=1e-10, atol=1e-12)
