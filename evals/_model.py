"""Shared plumbing for the evals: the model interface they rely on and how we run it.

Every evaluator needs the same three things done the same way: find the device the model lives
on, run it in eval mode under ``no_grad`` (restoring each submodule's previous mode afterwards,
so a locked tower that was deliberately kept in eval mode stays so), and optionally autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: An open_clip tokenizer: list of strings -> LongTensor [N, context_length].
Tokenizer = Callable[[list[str]], Tensor]


def encoder(model: nn.Module, name: str) -> Callable[[Tensor], Tensor]:
    """Return ``model.<name>`` (``encode_image`` / ``encode_text``) as a typed callable.

    The evals take any ``nn.Module`` with open_clip's ``encode_image(images)`` ([N, 3, H, W] ->
    [N, d]) and ``encode_text(tokens)`` ([N, L] -> [N, d]); outputs need not be normalised, the
    evals normalise in float32 as CLIP_benchmark does. Why a lookup: ``nn.Module``'s typed
    ``__getattr__`` does not let mypy call attributes, and a missing method deserves a clear error.
    """
    method = getattr(model, name, None)
    if not callable(method):
        raise TypeError(
            f"{type(model).__name__} has no {name}(): the evals need an open_clip-style model "
            "with encode_image(images) and encode_text(tokens)"
        )
    return method


def model_device(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """Return ``device`` if given, else the device of the model's first parameter, else CPU.

    Why: callers should not have to repeat where the model lives; a parameter-free fake is on CPU.
    """
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Run a block with ``model`` in eval mode and without gradients, then restore every mode.

    Why per submodule: ``model.train(was_training)`` would also flip submodules that were
    deliberately in a different mode (a frozen tower, frozen batch-norm statistics).
    """
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, was_training in saved:
            module.training = was_training


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``amp_dtype`` on ``device`` (e.g. ``torch.bfloat16``); a no-op when ``None``."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def encode_batches(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable[Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    out_device: torch.device | str | None = None,
) -> Tensor:
    """Encode each batch on ``device`` and return the concatenated L2-normalised float32 features.

    Why normalise in float32 after the (possibly autocast) forward: it mirrors CLIP_benchmark's
    ``F.normalize(model.encode_*(x))`` and keeps half-precision rounding out of the norms.
    ``out_device`` (default: ``device``) lets large sets be collected on the CPU.
    """
    target = torch.device(out_device) if out_device is not None else device
    chunks: list[Tensor] = []
    for batch in batches:
        with autocast(device, amp_dtype):
            features = encode(batch.to(device, non_blocking=True))
        chunks.append(F.normalize(features.float(), dim=-1).to(target))
    if not chunks:
        raise ValueError("encode_batches got no batches: nothing to encode")
    return torch.cat(chunks)


def slices(n: int, size: int) -> Iterator[slice]:
    """Yield consecutive ``slice`` objects covering ``range(n)`` in steps of ``size``."""
    if size <= 0:
        raise ValueError(f"batch/chunk size must be a positive integer, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
