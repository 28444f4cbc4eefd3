"""Zero-shot classification with CLIP_benchmark's definitions (LAION-AI/CLIP_benchmark).

A class is represented by the mean of its L2-normalised prompt embeddings, re-normalised; an
image's logits are ``100 * normalise(image_features) @ W.T``. Metrics: ``acc1``, ``acc5`` (NaN
with fewer than 5 classes), ``mean_per_class_recall`` (balanced accuracy of the argmax) and, for
multilabel targets, ``mean_average_precision``.

Example::

    clf = ZeroShotClassifier.from_pretrained("runs/demo", ["cat", "dog"])  # or an export, a name
    metrics = classification_metrics(clf.logits(["cat.jpg", "dog.png"]), torch.tensor([0, 1]))
    clf.save("classifiers/pets")  # class embeddings + names: safetensors + JSON, no pickle
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evals._model import (
    Tokenizer,
    encode_batches,
    encoder,
    inference,
    model_device,
    slices,
)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)
EMBEDDINGS_FILE = "class_embeddings.safetensors"
NAMES_FILE = "classifier.json"

#: Either generic templates containing ``{c}`` or, CuPL style, classname -> full prompts.
Templates = Sequence[str] | Mapping[str, Sequence[str]]
#: A float batch [N, 3, H, W], or a sequence of PIL images / file paths / [3, H, W] tensors.
Images = Tensor | Sequence[Any]
Preprocess = Callable[[Any], Tensor]


def expand_prompts(classnames: Sequence[str], templates: Templates) -> tuple[list[str], Tensor]:
    """Return every prompt and, for each, the index of its class.

    Why a flat list: prompts of all classes can then be encoded in full batches, whatever the
    number of prompts per class (CuPL dicts have a different number for each class).
    """
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError(f"classnames must be a non-empty list of strings, got {classnames!r}")
    if isinstance(templates, str):
        raise ValueError(
            f"templates must be a list of strings or a dict, not the string {templates!r}"
        )
    prompts: list[str] = []
    owners: list[int] = []
    if isinstance(templates, Mapping):
        missing = [c for c in classnames if c not in templates]
        if missing:
            raise ValueError(f"per-class templates have no prompts for classes {missing[:10]}")
        for index, name in enumerate(classnames):
            class_prompts = templates[name]
            if isinstance(class_prompts, str) or len(class_prompts) == 0:
                raise ValueError(f"templates[{name!r}] must be a non-empty list of prompts")
            prompts.extend(class_prompts)
            owners.extend([index] * len(class_prompts))
    else:
        if len(templates) == 0:
            raise ValueError("templates is empty: give at least one, e.g. DEFAULT_TEMPLATES")
        lacking = [t for t in templates if "{c}" not in t]
        if lacking:
            raise ValueError(f"templates {lacking[:5]} lack the '{{c}}' class-name placeholder")
        for index, name in enumerate(classnames):
            prompts.extend(template.format(c=name) for template in templates)
            owners.extend([index] * len(templates))
    return prompts, torch.tensor(owners, dtype=torch.long)


def build_class_embeddings(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Templates = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """Return the zero-shot weights [C, d] (float32, on ``device``), one unit row per class.

    Per class: mean of the L2-normalised prompt embeddings, re-normalised (CLIP_benchmark's
    ``zero_shot_classifier``, stored transposed). ``model`` must already live on ``device``.
    """
    run_device = model_device(model, device)
    prompts, owners = expand_prompts(classnames, templates)
    batches = (tokenizer(prompts[s]) for s in slices(len(prompts), batch_size))
    with inference(model):
        embeddings = encode_batches(encoder(model, "encode_text"), batches, run_device, amp_dtype)
    owners = owners.to(run_device)
    sums = torch.zeros(len(classnames), embeddings.shape[1], device=run_device)
    sums.index_add_(0, owners, embeddings)
    counts = torch.bincount(owners, minlength=len(classnames)).to(sums.dtype)
    return F.normalize(sums / counts[:, None], dim=-1)


class ZeroShotClassifier:
    """Classify images by cosine similarity to per-class text embeddings.

    ``class_embeddings`` [C, d] (unit rows) set the classifier's device; ``model`` must live there.
    ``preprocess`` (PIL image -> [3, H, W] tensor) is only needed for PIL images or file paths,
    and should be the one stored with the checkpoint (docs/architecture.md §6). ``tokenizer``
    is kept so the classifier can be rebuilt for new classes. ``amp_dtype`` autocasts the image
    tower.
    ``classnames`` (one per row) and ``templates`` are recorded for ``save`` and for reports.
    """

    def __init__(
        self,
        class_embeddings: Tensor,
        model: nn.Module,
        preprocess: Preprocess | None,
        tokenizer: Tokenizer | None,
        *,
        batch_size: int = 256,
        amp_dtype: torch.dtype | None = None,
        classnames: Sequence[str] | None = None,
        templates: Templates | None = None,
    ) -> None:
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] == 0:
            raise ValueError(
                f"class_embeddings must be [num_classes, dim], got {tuple(class_embeddings.shape)}"
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if classnames is not None and len(classnames) != class_embeddings.shape[0]:
            raise ValueError(
                f"{len(classnames)} class names for {class_embeddings.shape[0]} class embeddings"
            )
        self.class_embeddings = class_embeddings.float()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.classnames = list(classnames) if classnames is not None else None
        self.templates = templates

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Tokenizer,
        classnames: Sequence[str],
        templates: Templates = DEFAULT_TEMPLATES,
        preprocess: Preprocess | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> ZeroShotClassifier:
        """Build the class embeddings from prompts (see ``build_class_embeddings``) and wrap them.

        ``templates``: strings with ``{c}``, or a dict classname -> full prompts (CuPL).
        """
        weights = build_class_embeddings(
            model,
            tokenizer,
            classnames,
            templates,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
        )
        return cls(
            weights,
            model,
            preprocess,
            tokenizer,
            batch_size=batch_size,
            amp_dtype=amp_dtype,
            classnames=classnames,
            templates=templates,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike[str],
        classnames: Sequence[str],
        templates: Templates | None = None,
        pretrained: str | None = None,
        *,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
    ) -> ZeroShotClassifier:
        """Load a model and build its classifier for ``classnames``.

        ``path_or_name``: a vlp run directory (its newest complete checkpoint), a checkpoint
        or export directory, or an open_clip model name with ``pretrained`` (a tag or weights
        file); see :mod:`evals.loading`. Images are preprocessed with the preprocessing stored
        with the weights. ``templates`` default to ``DEFAULT_TEMPLATES`` ("a photo of a {c}.").
        """
        from evals.loading import load_model

        model, preprocess, tokenizer, _ = load_model(path_or_name, pretrained, device=device)
        return cls.from_model(
            model,
            tokenizer,
            classnames,
            DEFAULT_TEMPLATES if templates is None else templates,
            preprocess=preprocess,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
        )

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the class embeddings (safetensors) and class names/templates (JSON).

        Why not pickle: a classifier file may travel between users; safetensors and JSON
        cannot run code when read. Returns ``directory``.
        """
        from safetensors.torch import save_file

        if self.classnames is None:
            raise ValueError("this classifier has no class names to save; pass classnames=")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"class_embeddings": self.class_embeddings.cpu().contiguous()}, folder / EMBEDDINGS_FILE
        )
        templates = self.templates
        if templates is not None:
            templates = dict(templates) if isinstance(templates, Mapping) else list(templates)
        record = {"classnames": self.classnames, "templates": templates}
        (folder / NAMES_FILE).write_text(json.dumps(record, indent=1) + "\n")
        return folder

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        model: nn.Module,
        preprocess: Preprocess | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> ZeroShotClassifier:
        """Read what :meth:`save` wrote; the embeddings go to ``device`` (default: the model's)."""
        from safetensors.torch import load_file

        folder = Path(directory)
        record = json.loads((folder / NAMES_FILE).read_text())
        weights = load_file(folder / EMBEDDINGS_FILE)["class_embeddings"]
        return cls(
            weights.to(model_device(model, device)),
            model,
            preprocess,
            tokenizer,
            batch_size=batch_size,
            amp_dtype=amp_dtype,
            classnames=record["classnames"],
            templates=record.get("templates"),
        )

    @property
    def device(self) -> torch.device:
        """Where the class embeddings (and so the model and the computation) live."""
        return self.class_embeddings.device

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return int(self.class_embeddings.shape[0])

    def _image_batches(self, images: Images) -> Iterator[Tensor]:
        """Yield float batches [B, 3, H, W]; PIL images and paths go through ``preprocess``."""
        if isinstance(images, Tensor):
            if images.ndim != 4:
                raise ValueError(f"image tensor must be [N, 3, H, W], got {tuple(images.shape)}")
            for s in slices(images.shape[0], self.batch_size):
                yield images[s]
            return
        for s in slices(len(images), self.batch_size):
            yield torch.stack([self._load(item) for item in images[s]])

    def _load(self, item: Any) -> Tensor:
        """Turn one PIL image, file path or [3, H, W] tensor into a preprocessed tensor."""
        if isinstance(item, Tensor):
            return item
        if self.preprocess is None:
            raise ValueError(
                "ZeroShotClassifier got PIL images or paths but preprocess is None: pass the "
                "checkpoint's preprocess (e.g. from open_clip.create_model_and_transforms)"
            )
        if isinstance(item, (str, os.PathLike)):
            from PIL import Image

            with Image.open(item) as image:
                return self.preprocess(image.convert("RGB"))
        return self.preprocess(item)

    def logits(self, images: Images) -> Tensor:
        """Return ``100 * normalise(encode_image(x)) @ class_embeddings.T`` as float32 [N, C]."""
        if len(images) == 0:
            return torch.zeros(0, self.num_classes, device=self.device)
        with inference(self.model):
            features = encode_batches(
                encoder(self.model, "encode_image"),
                self._image_batches(images),
                self.device,
                self.amp_dtype,
            )
        return self.logits_from_features(features)

    def logits_from_features(self, features: Tensor) -> Tensor:
        """Logits [N, C] of image features [N, d] that are already L2-normalised (float32).

        Why: evaluations that stream a dataset encode it once and reuse the features.
        """
        return 100.0 * features.to(self.device, torch.float32) @ self.class_embeddings.T

    def predict(self, images: Images) -> Tensor:
        """Return the argmax class index of each image, LongTensor [N]."""
        return self.logits(images).argmax(dim=1)

    def predict_proba(self, images: Images) -> Tensor:
        """Return the softmax of the logits, [N, C] rows summing to one."""
        return self.logits(images).softmax(dim=1)


def topk_accuracy(logits: Tensor, targets: Tensor, k: int) -> float:
    """Fraction of rows whose target is among the ``k`` largest logits (``torch.topk``, as CB).

    Hits are counted and divided in Python (float64), as CB does, so values match it exactly.
    """
    top = logits.topk(k, dim=1, largest=True, sorted=True).indices
    return int((top == targets[:, None]).any(dim=1).sum()) / targets.shape[0]


def mean_per_class_recall(predictions: Tensor, targets: Tensor) -> float:
    """Balanced accuracy: recall of each class present in ``targets``, averaged over them.

    Same as sklearn's ``balanced_accuracy_score`` (what CLIP_benchmark calls), which ignores
    classes that only appear among the predictions; recalls in float64 averaged by NumPy, like
    sklearn, so values match it exactly.
    """
    recalls = []
    for c in torch.unique(targets).tolist():
        members = targets == c
        recalls.append(int((predictions[members] == c).sum()) / int(members.sum()))
    return float(np.mean(recalls))


def average_precision_per_class(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each class [C] from scores [N, C] and 0/1 targets [N, C].

    CLIP_benchmark's (torchnet's) definition: rank samples by score, average the precision at
    the rank of each positive. A class without positives gets NaN here (CB writes 0).
    """
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float32)
    ap = torch.full((scores.shape[1],), float("nan"))
    for k in range(scores.shape[1]):
        order = torch.sort(scores[:, k], descending=True, stable=True).indices
        truth = targets[order, k].bool()
        if truth.any():
            precision = truth.float().cumsum(0) / ranks
            ap[k] = precision[truth].sum() / truth.sum()
    return ap


def classification_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """CLIP_benchmark's zero-shot classification metrics as plain Python floats.

    ``targets`` [N] of class indices: ``acc1``, ``acc5`` (NaN with fewer than 5 classes) and
    ``mean_per_class_recall``. ``targets`` [N, C] of 0/1 (multilabel): ``mean_average_precision``
    over all C classes; as in CLIP_benchmark, a class without positives counts as AP 0 (it
    lowers the mean: evaluate on sets where every class occurs).
    """
    logits = logits.detach().float().cpu()
    targets = targets.detach().cpu()
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty [N, C] tensor, got {tuple(logits.shape)}")
    if targets.ndim == 2:
        if targets.shape != logits.shape:
            raise ValueError(
                f"multilabel targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}"
            )
        ap = average_precision_per_class(logits, targets).nan_to_num(0.0)
        return {"mean_average_precision": ap.mean().item()}
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be [N] (or [N, C] multilabel) with N={logits.shape[0]}, "
            f"got {tuple(targets.shape)}"
        )
    targets = targets.long()
    num_classes = logits.shape[1]
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got {targets.unique().tolist()}")
    return {
        "acc1": topk_accuracy(logits, targets, 1),
        "acc5": topk_accuracy(logits, targets, 5) if num_classes >= 5 else math.nan,
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), targets),
    }
