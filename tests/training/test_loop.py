"""The loop's safety rails, in process: non-finite losses are skipped, then stop the run."""

import copy

import pytest
import torch

from vlp.config import Config
from vlp.models import create_model
from vlp.objectives import create_objective, total_loss
from vlp.training import Trainer, create_accelerator


def _trainer(tmp_path, **train):
    model, _, _, tokenizer = create_model("vlp-tiny-vit")
    config = Config()
    config.train.out_dir = str(tmp_path)
    for key, value in train.items():
        setattr(config.train, key, value)
    trainer = Trainer(
        config,
        model,
        create_objective("clip"),
        (),
        accelerator=create_accelerator(tmp_path, log_with=None),
        model_info={},
    )
    return trainer, tokenizer


def _batch(tokenizer, image_value=None):
    image = torch.randn(4, 3, 32, 32)
    if image_value is not None:
        image.fill_(image_value)
    return {"image": image, "text": tokenizer(["a red star", "a blue ring", "a cross", "a heart"])}


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
    trainer, tokenizer = _trainer(tmp_path, max_nonfinite_steps=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    parts, stop = trainer.train_step(_batch(tokenizer, float("nan")))
    assert parts is None and not stop and trainer.step == 0 and trainer.nonfinite_total == 1
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)
    with pytest.raises(FloatingPointError, match="2 non-finite losses in a row"):
        trainer.train_step(_batch(tokenizer, float("nan")))


def test_a_finite_step_updates_and_clamps_the_scale(tmp_path):
    trainer, tokenizer = _trainer(tmp_path)
    with torch.no_grad():
        trainer.model.logit_scale.fill_(10.0)  # s = e^10 > 100
    parts, _ = trainer.train_step(_batch(tokenizer))
    assert parts is not None and trainer.step == 1
    assert float(trainer.model.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-5)


def _scale_gradient(model, micro_batches):
    """d loss / d logit_scale of one batch holding every micro-batch (the full-batch gradient)."""
    model = copy.deepcopy(model)
    joined = {k: torch.cat([m[k] for m in micro_batches]) for k in ("image", "text")}
    total_loss(create_objective("clip")(model(**joined), joined)).backward()
    return float(model.logit_scale.grad)


def test_accumulated_micro_batches_make_one_step(tmp_path):
    """accum_steps=2: two micro-batches, one optimizer step, sample count of both. The scale
    takes AdamW's first step, lr against the sign of the full-batch gradient (no decay on it)."""
    trainer, tokenizer = _trainer(tmp_path, accum_steps=2)
    assert trainer.global_batch == 2 * trainer.config.data.batch_size
    micro = [_batch(tokenizer), _batch(tokenizer)]
    gradient = _scale_gradient(trainer.model, micro)
    assert abs(gradient) > 1e-3  # the sign below means something
    (lr,) = {g["lr"] for g in trainer.optimizer.param_groups}
    before = float(trainer.model.logit_scale.detach())
    parts, _ = trainer.train_step(micro)
    assert parts is not None and trainer.step == 1 and "contrastive_loss" in parts
    moved = float(trainer.model.logit_scale.detach()) - before
    # rel 0.1: the float32 scale (~2.66) is stored to ~2.4e-7, 5 % of this warmup lr of 5e-6
    assert moved == pytest.approx(-lr if gradient > 0 else lr, rel=0.1)
    parts, _ = trainer.train_step([_batch(tokenizer), _batch(tokenizer, float("nan"))])
    assert parts is None and trainer.step == 1 and trainer.nonfinite_total == 1
