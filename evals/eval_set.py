"""What an evaluation dataset is, whatever its layout: named samples with a target or captions.

A layout reader (:mod:`evals.wds_layout`, :mod:`evals.file_sets`) turns a folder or file into an
:class:`EvalSet`; :mod:`evals.batches` decodes and batches its samples. Samples carry their
image undecoded (bytes or a path) so that decoding happens where the batches are made, in
worker processes if asked, and an image that does not decode is counted there, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

Kind = Literal["classification", "multilabel", "retrieval"]
KINDS: tuple[str, ...] = ("classification", "multilabel", "retrieval")


class EvalDataError(ValueError):
    """A dataset that cannot be evaluated as asked; the message names the file, shard or key."""


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample.

    ``target``: a class index (classification), a 0/1 list over the classes (multilabel), or
    None (retrieval, whose ``captions`` hold the image's captions). ``where`` names the sample
    in messages (a file path, or shard and key).
    """

    key: str
    where: str
    image: bytes | str
    target: int | list[int] | None = None
    captions: tuple[str, ...] = ()


@dataclass
class EvalSet:
    """A dataset to evaluate: its kind, class names and templates (if any), and its samples.

    ``name`` is the dataset as CLIP_benchmark-shaped results name it (``wds/<folder>`` for
    CLIP_benchmark's webdataset layout). ``read`` returns a fresh iterator over the samples,
    in a fixed order, each time it is called.
    """

    name: str
    source: str
    kind: Kind
    classnames: list[str] | None
    templates: list[str] | None
    read: Callable[[], Iterator[RawSample]]

    def check_target(self, sample: RawSample) -> None:
        """Raise EvalDataError when the sample's label does not fit the class names."""
        if self.classnames is None or sample.target is None:
            return
        count = len(self.classnames)
        if isinstance(sample.target, int):
            if not 0 <= sample.target < count:
                raise EvalDataError(
                    f"{sample.where}: label {sample.target} but the dataset has {count} class "
                    f"names ({self.source}); the class names and the labels disagree"
                )
        elif len(sample.target) != count:
            raise EvalDataError(
                f"{sample.where}: multilabel target of length {len(sample.target)} but the "
                f"dataset has {count} class names ({self.source})"
            )
