"""Image captioning with CoCa models: generate captions, score them with BLEU-4 and CIDEr.

:func:`generate_captions` decodes captions from a CoCa model (open_clip ``coca_model.py``, as the
``prior`` objective trains it; a :class:`~vlp.models.vlp_model.VlpModel` around one works too).
:func:`captioning_scores` scores them against reference captions with pycocoevalcap's BLEU and
CIDEr scorers. :func:`captioning_task` does both over a captioned
:class:`~evals.eval_set.EvalSet` (what ``vlp eval retrieval`` reads), as CLIP_benchmark's
``captioning`` task does, for ``vlp eval captioning``.

Why the decoding is ours and not ``CoCa.generate``: open_clip 3.3's ``coca_model`` imports
transformers' ``BeamSearchScorer``, which transformers 5 removed; without it open_clip turns
``generate`` off altogether (greedy included). The loop below makes the calls ``generate`` makes
(the image tower once, then ``CoCa.forward`` with the cached image embeddings for each next
token) and keeps its defaults: start at the tokenizer's start token, no end token before
``min_len`` tokens (open_clip's ``min_seq_len`` = 5, start token included), at most ``max_len``.

Example::

    model, _, preprocess, tokenizer = create_model("vlp-tiny-coca")
    captions = generate_captions(model, images, tokenizer, method="beam", num_beams=4)
    captioning_scores({0: ["a red circle on white"]}, {0: captions[0]})  # {"bleu4": .., "cider": ..}
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from open_clip import CoCa
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch import Tensor, nn

from evals._model import Tokenizer, autocast, inference, model_device
from evals.batches import decode_sample, iter_batches
from evals.eval_set import EvalDataError, EvalSet, RawSample
from evals.plots import plot_caption_grid
from evals.tasks import EncodeOptions, Preprocess, TaskResult

Method = Literal["greedy", "beam"]
METHODS: tuple[str, ...] = ("greedy", "beam")
MIN_LEN = 5
"""open_clip's ``min_seq_len``: no end token before this many tokens (start token included)."""
MAX_LEN = 30
"""open_clip's ``seq_len``: the default longest caption, start token included (cut to the
model's context length when that is shorter)."""

Key = TypeVar("Key", bound=Hashable)


class CaptioningError(ValueError):
    """A model or generation setting that cannot caption (not a CoCa, a bad length...)."""


def captioner(model: nn.Module) -> CoCa:
    """The CoCa inside ``model`` (a bare CoCa, or a VlpModel's ``.clip``).

    Raises CaptioningError naming the model type when there is none: only CoCa models have the
    text decoder that writes captions.
    """
    from vlp.models.vlp_model import VlpModel

    inner = model.clip if isinstance(model, VlpModel) else model
    if not isinstance(inner, CoCa):
        raise CaptioningError(
            f"{type(inner).__name__} cannot caption: captioning needs a CoCa model (open_clip "
            "CoCa, e.g. vlp-tiny-coca or a run of the prior objective)"
        )
    return inner


def _checked(
    model: nn.Module, method: str, max_len: int | None, min_len: int, num_beams: int
) -> tuple[CoCa, int, int]:
    """The model's CoCa, the beam count ``method`` uses and ``max_len`` (default: ``MAX_LEN`` or
    the context length if shorter); CaptioningError for bad settings."""
    coca = captioner(model)
    if method not in METHODS:
        raise CaptioningError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if num_beams < 1:
        raise CaptioningError(f"num_beams must be >= 1, got {num_beams}")
    max_len = min(MAX_LEN, coca.context_length) if max_len is None else max_len
    if not 1 <= min_len < max_len <= coca.context_length:
        raise CaptioningError(
            f"need 1 <= min_len < max_len <= {coca.context_length} (the model's context "
            f"length), got min_len={min_len}, max_len={max_len}"
        )
    return coca, 1 if method == "greedy" else num_beams, max_len


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(start, end) token ids of an open_clip ``SimpleTokenizer``-like tokenizer."""
    start, end = getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)
    if start is None or end is None or not callable(getattr(tokenizer, "decode", None)):
        raise CaptioningError(
            f"{type(tokenizer).__name__} has no sot_token_id/eot_token_id/decode: captioning "
            "decodes with open_clip's SimpleTokenizer"
        )
    return int(start), int(end)


def _beam_search(
    coca: CoCa,
    images: Tensor,
    *,
    start: int,
    end: int,
    max_len: int,
    min_len: int,
    beams: int,
) -> Tensor:
    """Token ids [b, <= max_len] (start token first) of each image's best of ``beams`` beams.

    Plain beam search, scored by the sum of token log-probabilities; a beam that has written the
    end token keeps its place, continued by the pad id at no cost, and the final choice divides
    each beam's score by its length (transformers' default ``length_penalty=1``). One beam is
    greedy decoding. The pad id is never generated: CoCa's caption loss never trains it, and
    open_clip's ``generate`` would end a caption on it.
    """
    b, pad, device = images.shape[0], coca.pad_id, images.device
    images = images.repeat_interleave(beams, dim=0)
    image_latent, image_embs = coca._encode_image(images)
    tokens = torch.full((b * beams, 1), start, dtype=torch.long, device=device)
    scores = torch.full((b, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam at first, so that the beams start from distinct tokens
    ended = torch.zeros(b * beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * beams, device=device)
    first_beam = torch.arange(b, device=device)[:, None] * beams
    while tokens.shape[1] < max_len and not bool(ended.all()):
        out = coca(images, tokens, image_latent=image_latent, image_embs=image_embs,
                   output_labels=False)  # fmt: skip
        logits = out["logits"][:, -1].float()
        logits[:, pad] = float("-inf")
        if tokens.shape[1] < min_len:
            logits[:, end] = float("-inf")
        logprobs = logits.log_softmax(dim=-1)
        logprobs[ended] = float("-inf")
        logprobs[ended, pad] = 0.0
        vocab = logprobs.shape[1]
        total = (scores.reshape(-1, 1) + logprobs).reshape(b, beams * vocab)
        scores, best = total.topk(beams, dim=1)
        rows = (first_beam + best // vocab).reshape(-1)
        new = (best % vocab).reshape(-1)
        lengths = lengths[rows] + (~ended[rows]).float()
        ended = ended[rows] | (new == end)
        tokens = torch.cat([tokens[rows], new[:, None]], dim=1)
    choice = (scores / lengths.reshape(b, beams)).argmax(dim=1)
    return tokens.reshape(b, beams, -1)[torch.arange(b, device=device), choice]


def _decode(tokenizer: Any, ids: list[int], end: int) -> str:
    """The text of one generated row: after the start token, up to the end token."""
    ids = ids[1:]
    if end in ids:
        ids = ids[: ids.index(end)]
    return str(tokenizer.decode(ids)).strip()


def generate_captions(
    model: nn.Module,
    images: Tensor,
    tokenizer: Tokenizer,
    *,
    method: Method = "greedy",
    max_len: int | None = None,
    num_beams: int = 6,
    min_len: int = MIN_LEN,
    amp_dtype: torch.dtype | None = None,
) -> list[str]:
    """One caption per image of ``images`` [b, 3, H, W] (preprocessed), written by a CoCa.

    ``method``: ``"greedy"`` (the most likely token each step) or ``"beam"`` (``num_beams``
    beams). Captions hold ``min_len - 1`` to ``max_len - 1`` tokens (the start token counts);
    ``max_len`` (open_clip's ``seq_len``; default 30, or the context length if shorter) must
    fit the model's context length.
    ``model`` is a CoCa or a VlpModel around one; it runs in eval mode without gradients on its
    own device, autocast to ``amp_dtype`` if given; the tokenizer gives the start/end ids and
    decodes. Raises CaptioningError (a ValueError) for a model that is not a CoCa (naming its
    type) and for impossible settings.
    """
    coca, beams, max_len = _checked(model, method, max_len, min_len, num_beams)
    start, end = _special_ids(tokenizer)
    device = model_device(coca)
    with inference(model), autocast(device, amp_dtype):
        ids = _beam_search(
            coca,
            images.to(device),
            start=start,
            end=end,
            max_len=max_len,
            min_len=min_len,
            beams=beams,
        )
    return [_decode(tokenizer, row, end) for row in ids.tolist()]


def _words(text: str) -> str:
    """Lower-cased words (letters, digits, apostrophes) joined by single spaces."""
    return " ".join(re.findall(r"[\w']+", text.lower()))


def captioning_scores(
    references: Mapping[Key, Sequence[str]], predictions: Mapping[Key, str]
) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr (COCO's CIDEr-D) of ``predictions`` against ``references``.

    Both map the same keys (one per image) to the image's reference captions and its one
    predicted caption. pycocoevalcap's ``Bleu(4)`` and ``Cider()`` score them after a simple
    tokenisation: lower-cased, punctuation dropped, split on whitespace. COCO's (and
    CLIP_benchmark's ``Bleu_4`` / ``CIDEr``) tokenise with pycocoevalcap's PTBTokenizer, which
    needs Java, so numbers can differ slightly from theirs; hence our own key names. METEOR and
    SPICE need Java too and are left out. CIDEr weighs n-grams by their rarity across the
    images' references, so it needs several images: with a single image it is always 0.

    Raises ValueError when the keys differ, there are none, or an image has no reference.
    """
    if set(references) != set(predictions):
        missing = len(set(references) - set(predictions))
        extra = len(set(predictions) - set(references))
        raise ValueError(
            f"references and predictions must have the same keys: {missing} images have no "
            f"prediction, {extra} predictions have no references"
        )
    if not predictions:
        raise ValueError("no captions to score")
    empty = [key for key, texts in references.items() if not texts]
    if empty:
        raise ValueError(f"image {empty[0]!r} has no reference caption")
    gts = {key: [_words(text) for text in texts] for key, texts in references.items()}
    res = {key: [_words(predictions[key])] for key in references}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


@dataclass
class CaptioningResult(TaskResult):
    """A captioning result: the generated caption of each image (by ``RawSample.where``) and a
    few (image, generated caption, references) for the PNG grid."""

    predictions: dict[str, str] = field(default_factory=dict)
    examples: list[tuple[Image.Image, str, list[str]]] = field(default_factory=list)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """A grid of images with their generated and reference captions."""
        return plot_caption_grid(self.examples, path)


def captioning_task(
    model: nn.Module,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    eval_set: EvalSet,
    *,
    method: Method = "greedy",
    max_len: int | None = None,
    min_len: int = MIN_LEN,
    num_beams: int = 6,
    options: EncodeOptions | None = None,
    examples: int = 8,
) -> CaptioningResult:
    """Caption every image of a captioned ``eval_set`` and score the captions against its own
    (CLIP_benchmark's ``captioning`` task, with :func:`captioning_scores`).

    Images are decoded and batched as for retrieval (``options``: batch size, workers, autocast;
    the model runs where it is); images that do not decode are counted and left out. The result
    holds ``bleu4`` and ``cider``, each image's caption, and the first ``examples`` images for
    the grid. Raises CaptioningError before reading any image when the model cannot caption,
    EvalDataError when the dataset has no captions or no image decodes.
    """
    options = options or EncodeOptions()
    _, _, max_len = _checked(model, method, max_len, min_len, num_beams)
    _special_ids(tokenizer)
    if eval_set.kind != "retrieval":
        raise EvalDataError(
            f"{eval_set.source} is a {eval_set.kind} dataset; captioning needs captions"
        )
    samples: list[RawSample] = []
    skipped: list[tuple[str, str]] = []
    captions: list[str] = []
    batches = iter_batches(
        eval_set, preprocess, batch_size=options.batch_size, workers=options.workers
    )
    for batch in batches:
        skipped.extend(batch.skipped)
        uncaptioned = next((sample for sample in batch.samples if not sample.captions), None)
        if uncaptioned is not None:
            raise EvalDataError(f"{uncaptioned.where}: no caption to score a generated one against")
        if batch.samples:
            samples.extend(batch.samples)
            captions += generate_captions(
                model,
                batch.images,
                tokenizer,
                method=method,
                max_len=max_len,
                min_len=min_len,
                num_beams=num_beams,
                amp_dtype=options.amp_dtype,
            )
    if not samples:
        raise EvalDataError(
            f"{eval_set.source}: no image to evaluate"
            + (f" ({len(skipped)} did not decode)" if skipped else " (the dataset is empty)")
        )
    references = [list(sample.captions) for sample in samples]
    metrics = captioning_scores(dict(enumerate(references)), dict(enumerate(captions)))
    predictions = {sample.where: caption for sample, caption in zip(samples, captions, strict=True)}
    generation = {"method": method, "max_len": max_len, "min_len": min_len}
    if method == "beam":
        generation["num_beams"] = num_beams
    return CaptioningResult(
        "captioning",
        metrics,
        len(samples),
        skipped,
        extra={
            "captions": sum(len(texts) for texts in references),
            "generation": generation,
            "predictions": predictions,
        },
        predictions=predictions,
        examples=[
            (decode_sample(samples[i]), captions[i], references[i])
            for i in range(min(examples, len(samples)))
        ],
    )
