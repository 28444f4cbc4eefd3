"""CLIP_benchmark itself, run on given features: the reference our parity tests and the eval
benchmark compare with. Needs the dev dependency ``clip-benchmark`` (pinned in requirements.txt).

CLIP_benchmark's metric code only takes a model, a dataloader and a tokenizer. To run it on
exactly the features our functions see, :class:`FeatureModel` is a "model" whose images are
feature vectors (``encode_image`` is the identity) and whose prompts are looked up in a table of
text features (``encode_text``), with :class:`TableTokenizer` turning each prompt into its row.
Its NumPy 2.4 crash is worked around by ``evals.clip_benchmark_cli.numpy_scalar_fix``.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from evals.clip_benchmark_cli import numpy_scalar_fix


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
