"""The objective registry and the clip objective's contract."""

import pytest
import torch
import torch.nn.functional as F

from vlp.distributed import contrastive_loss
from vlp.objectives import create_objective, list_objectives, total_loss


def test_clip_is_registered():
    assert "clip" in list_objectives()


def test_unknown_objective_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown objective 'clp'.*'clip'"):
        create_objective("clp")


def test_clip_batch_loss_is_the_contrastive_core():
    z = F.normalize(torch.randn(6, 8), dim=-1)
    w = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(12.0)
    objective = create_objective("clip", weights=(0.75, 0.25), smoothing=0.1)
    losses = objective({"image_features": z, "text_features": w, "logit_scale": scale}, {})
    expected = contrastive_loss(z, w, scale, weights=(0.75, 0.25), smoothing=0.1)
    torch.testing.assert_close(losses["contrastive_loss"], expected)
    torch.testing.assert_close(total_loss(losses), expected)
    assert dict(objective.fields().views) == {"image": "openclip"}


def test_clip_rejects_bad_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        create_objective("clip", smoothing=1.5)


def test_total_loss_needs_a_loss_key():
    with pytest.raises(ValueError, match="_loss"):
        total_loss({"logit_scale": torch.tensor(1.0)})
