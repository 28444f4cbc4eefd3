"""The distributed contrastive loss against a float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.ddp_helpers import run_on_ranks
from tests.distributed.references import infonce_reference, sigmoid_reference, unit_features
from vlp.distributed import NonFiniteFeaturesError, contrastive_loss, sigmoid_loss


def _leaves(*tensors):
    return [t.clone().detach().requires_grad_() for t in tensors]


def _assert_same_forward_backward(ours, ref, leaves, ref_leaves, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    ours.backward()
    ref.backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.75, 0.25), (1.0, 0.3)])
@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("tile", [None, 1, 3, 4])
def test_infonce_matches_reference(n, weights, alpha, tile):
    """Forward and backward (both feature sets and the scale), tiles that do and do not divide n."""
    z, w = unit_features(n)
    leaves = _leaves(z, w, torch.tensor(7.0, dtype=torch.float64))
    ref_leaves = _leaves(*leaves)
    ours = contrastive_loss(*leaves, weights=weights, smoothing=alpha, tile_size=tile)
    ref = infonce_reference(*ref_leaves, weights=weights, alpha=alpha)
    _assert_same_forward_backward(ours, ref, leaves, ref_leaves)


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("tile", [None, 3, 4])
def test_sigmoid_matches_reference(n, tile):
    """SigLIP forward and backward (features, scale and bias) against the plain formula."""
    z, w = unit_features(n)
    scalars = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    leaves = _leaves(z, w, *scalars)
    ref_leaves = _leaves(*leaves)
    ours = sigmoid_loss(*leaves, tile_size=tile)
    _assert_same_forward_backward(ours, sigmoid_reference(*ref_leaves), leaves, ref_leaves)


def test_fixed_float_scale_and_no_grad_on_scale():
    """ConVIRT's fixed temperature: a float scale; gradients still reach the features."""
    z, w = _leaves(*unit_features(6))
    ref_z, ref_w = _leaves(z, w)
    ours = contrastive_loss(z, w, 10.0, weights=(0.75, 0.25), tile_size=4)
    ref = infonce_reference(ref_z, ref_w, 10.0, weights=(0.75, 0.25))
    _assert_same_forward_backward(ours, ref, [z, w], [ref_z, ref_w])


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_scale_and_bias_of_shape_one_get_gradients_of_their_shape(loss):
    """FSDP shards along dim 0 and refuses 0-dim parameters, so under FSDP the learned scale and
    bias are ``[1]`` (vlp.training.model_state): same values and gradients as 0-dim."""
    grads = {}
    for shape in ((), (1,)):
        z, w = unit_features(6)
        scale = torch.full(shape, 10.0, dtype=torch.float64, requires_grad=True)
        bias = torch.full(shape, -2.0, dtype=torch.float64, requires_grad=True)
        if loss == "infonce":
            value = contrastive_loss(z, w, scale, tile_size=4)
        else:
            value = sigmoid_loss(z, w, scale, bias, tile_size=4)
        value.backward()
        assert scale.grad is not None and scale.grad.shape == shape
        grads[shape] = (
            float(value),
            float(scale.grad.sum()),
            float(bias.grad.sum() if bias.grad is not None else 0),
        )
    assert grads[()] == pytest.approx(grads[(1,)], rel=1e-12)


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_bfloat16_inputs_are_computed_in_float32(loss):
    """bf16 features: the loss equals the float64 reference on the same bf16 values to 1e-5
    (it is computed in float32); gradients come back in bf16, within bf16 rounding (2⁻⁸)."""
    z, w = unit_features(32, d=64, dtype=torch.bfloat16)
    s, bias = torch.tensor(20.0), torch.tensor(-5.0)
    leaves = _leaves(z, w, s, bias)
    ref_leaves = _leaves(z.double(), w.double(), s.double(), bias.double())
    if loss == "infonce":
        ours = contrastive_loss(*leaves[:3], weights=(0.75, 0.25), smoothing=0.1, tile_size=5)
        ref = infonce_reference(*ref_leaves[:3], weights=(0.75, 0.25), alpha=0.1)
        leaves, ref_leaves = leaves[:3], ref_leaves[:3]
    else:
        ours = sigmoid_loss(*leaves, tile_size=5)
        ref = sigmoid_reference(*ref_leaves)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    ours.backward()
    ref.backward()
    assert leaves[0].grad.dtype == torch.bfloat16
    for a, b in zip(leaves, ref_leaves, strict=True):
        scale = float(b.grad.abs().max())
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2**-7, atol=2**-7 * scale)


def test_rejects_bad_arguments():
    z, w = unit_features(4)
    with pytest.raises(ValueError, match="smoothing"):
        contrastive_loss(z, w, 1.0, smoothing=1.0)
    with pytest.raises(ValueError, match="weights"):
        contrastive_loss(z, w, 1.0, weights=(-1.0, 2.0))
    with pytest.raises(ValueError, match=r"\[b, d\]"):
        contrastive_loss(z, w[:3], 1.0)
    with pytest.raises(ValueError, match="tile_size"):
        contrastive_loss(z, w, 1.0, tile_size=0)
    with pytest.raises(NonFiniteFeaturesError, match="rank"):
        contrastive_loss(z * float("nan"), w, 1.0)
    with pytest.raises(NonFiniteFeaturesError, match="rank"):
        sigmoid_loss(z, w * float("inf"), 1.0, 0.0)


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
