"""CLIP_benchmark itself, run on given features: the reference our parity tests and benchmarks
compare with. Needs the dev dependency ``clip-benchmark`` (pinned in requirements.txt).

CLIP_benchmark's metric code only takes a model, a dataloader and a tokenizer. To run it on
exactly the features our functions see, :class:`FeatureModel` is a "model" whose images are
feature vectors (``encode_image`` is the identity) and whose prompts are looked up in a table of
text features (``encode_text``), with :class:`TableTokenizer` turning each prompt into its row.

Two quirks of clip-benchmark 1.6.2 are handled here, and only here:

- its ``accuracy`` calls ``float()`` on a 1-element NumPy array, which NumPy >= 2.4 refuses
  ("only 0-dimensional arrays can be converted"); :func:`numpy_scalar_fix` lends its module a
  ``float`` that accepts such arrays, for the duration of a call. The computation is unchanged.
- its CLI imports ``requests`` without declaring it (the dev requirements pin it).

``python -m evals.clip_benchmark_ref eval ...`` runs CLIP_benchmark's CLI under that fix.
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


def _float(value: Any) -> float:
    """``float()`` that also takes a 1-element array (NumPy < 2.4 behaviour)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return builtins.float(value.item())
    return builtins.float(value)


@contextmanager
def numpy_scalar_fix() -> Iterator[None]:
    """Let clip-benchmark 1.6.2's ``zeroshot_classification.accuracy`` run under NumPy 2.4."""
    from clip_benchmark.metrics import zeroshot_classification as module

    had = "float" in vars(module)
    previous = vars(module).get("float")
    module.float = _float
    try:
        yield
    finally:
        if had:
            module.float = previous
        else:
            del module.float


class TableTokenizer:
    """Tokenizer whose "token" for a prompt is the prompt's row in a text-feature table."""

    def __init__(self, prompts: Sequence[str]) -> None:
        self.rows = {prompt: row for row, prompt in enumerate(prompts)}

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return torch.tensor([[self.rows[text]] for text in texts])


class FeatureModel(nn.Module):
    """A CLIP-like model over given features: images are feature rows, prompts table rows."""

    text_features: Tensor

    def __init__(self, text_features: Tensor) -> None:
        super().__init__()
        self.register_buffer("text_features", text_features)

    def encode_image(self, images: Tensor) -> Tensor:
        return images

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.text_features[tokens[:, 0]]


class _Pairs(Dataset):
    def __init__(
        self, inputs: Tensor, outputs: Tensor | Sequence[Any], classes: Sequence[str] | None
    ) -> None:
        self.inputs, self.outputs, self.classes = inputs, outputs, classes

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        return self.inputs[i], self.outputs[i]


def zeroshot_classification(
    image_features: Tensor,
    targets: Tensor,
    prompt_features: Mapping[str, Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_classification.evaluate`` (fp32, CPU) on given features.

    ``prompt_features`` maps every prompt (template filled with a class name, or a CuPL
    prompt) to its text feature.
    """
    from clip_benchmark.metrics import zeroshot_classification as module

    prompts = list(prompt_features)
    model = FeatureModel(torch.stack([prompt_features[p] for p in prompts]))
    loader = DataLoader(
        _Pairs(image_features, targets, classnames), batch_size=batch_size, shuffle=False
    )
    templates_arg = dict(templates) if isinstance(templates, Mapping) else list(templates)
    with numpy_scalar_fix():
        metrics = module.evaluate(
            model, loader, TableTokenizer(prompts), list(classnames), templates_arg, "cpu",
            amp=False,
        )  # fmt: skip
    return {key: builtins.float(value) for key, value in metrics.items()}


def _caption_lists(batch: list[tuple[Tensor, list[str]]]) -> tuple[Tensor, list[list[str]]]:
    return torch.stack([image for image, _ in batch]), [texts for _, texts in batch]


def zeroshot_retrieval(
    image_features: Tensor,
    text_features: Tensor,
    texts_image_index: Sequence[int],
    recall_k: Sequence[int],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_retrieval.evaluate`` (fp32, CPU) on given features.

    Its dense method: the whole N_txt x N_img score matrix plus a boolean one (~5 bytes/pair).
    """
    from clip_benchmark.metrics import zeroshot_retrieval as module

    captions: list[list[str]] = [[] for _ in range(len(image_features))]
    for row, image in enumerate(texts_image_index):
        captions[int(image)].append(str(row))
    loader = DataLoader(
        _Pairs(image_features, captions, None),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_caption_lists,
    )
    tokenizer = TableTokenizer([str(row) for row in range(len(text_features))])
    metrics = module.evaluate(
        FeatureModel(text_features), loader, tokenizer, "cpu", amp=False,
        recall_k_list=list(recall_k),
    )  # fmt: skip
    return {key: builtins.float(value) for key, value in metrics.items()}


def main() -> None:
    """CLIP_benchmark's command line, with :func:`numpy_scalar_fix` applied."""
    from clip_benchmark import cli

    with numpy_scalar_fix():
        sys.exit(cli.main())


if __name__ == "__main__":
    main()
