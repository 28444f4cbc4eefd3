"""What a training batch carries: named image views, text fields and JSON fields.

An objective declares its inputs as a :class:`BatchFields` (several augmented views of the same
image, several texts each with its own tokenizer, values passed through from the sample's
``json``) and the stream reads exactly that (``make_train_stream(fields=...)``). What changes
the batches (names, sources, presets, tokenizer names, how a sentence is chosen) is part of the
stream's resume fingerprint (:meth:`BatchFields.fingerprint_parts`), so a resume with other
fields is refused instead of silently continuing another sequence.

Batch keys: each view's name -> stacked transform outputs ``[b, ...]``; each text's name ->
its tokenizer's tensor; each JSON field's name -> :func:`collate_json` (with ``<name>_mask``
for padded lists); each array field's name -> :func:`collate_arrays` (with its mask);
``__key__`` -> the sample keys. Names must not clash (``ValueError``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from data_pipelines.decode import SampleError
from data_pipelines.sidecar import CONVERTED_SIZE_KEY, open_sidecar, sidecar_metadata
from data_pipelines.text_sources import TextSource

CHOICES = ("all", "sentence")
"""``TextField.choose``: the whole text, or one sentence of it drawn per sample and step."""
STREAM_KEYS = ("__key__", "__stream__")
"""Batch keys the stream itself uses."""

FingerprintParts = tuple[tuple[str | int, ...], ...]


def mask_key(name: str) -> str:
    """The batch key of JSON field ``name``'s padding mask."""
    return f"{name}_mask"


def fallback_key(name: str) -> str:
    """The batch key of text field ``name``'s per-sample "used its fallback" flags."""
    return f"{name}_fallback"


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")


@dataclass(frozen=True)
class ImageView:
    """One augmented view of the sample's image, under batch key ``name``.

    Every view transforms the SAME decoded image. Torch's CPU RNG is seeded before each view:
    view 0 with the sample's stream seed (today's single-view seed), view i > 0 with a seed
    derived from it and i, so views differ from each other and exact resume still holds.
    ``preset`` names the augmentation (``"openclip"``, ``"convirt"``, ...): it goes into the
    resume fingerprint, since the callable itself cannot be compared across runs.
    """

    name: str
    transform: Callable[[Image.Image], torch.Tensor]
    preset: str = ""

    def __post_init__(self) -> None:
        _check_name("image view", self.name)
        if not callable(self.transform):
            raise ValueError(f"image view '{self.name}': transform must be callable")


@dataclass(frozen=True)
class TextField:
    """A text of the sample, tokenised per batch, under batch key ``name``.

    ``source``: a tar member suffix (``"txt"``, ``"summary.txt"``), ``"json:<key>"`` for a
    text value of the sample's json, ``"phrases:<key>"`` or ``"first_clause:<source>"``
    (:mod:`data_pipelines.text_sources`). ``fallback``: another source, read when the sample
    lacks ``source``; the batch then carries ``<name>_fallback`` (bool ``[b]``) so that its
    use is counted. ``choose="sentence"`` draws ONE sentence of the text
    (:func:`data_pipelines.sentences.split_sentences`), uniformly, from a seed of the sample's
    place in the stream: the same sample read in another epoch draws again, independently,
    and a resumed stream draws exactly what the uninterrupted one did. Sentences (or, with
    ``choose="all"``, the whole text) with fewer than ``min_words`` whitespace-separated words
    are dropped; a sample with nothing left is skipped and counted as bad data.
    ``tokenizer_name`` identifies the tokenizer in the resume fingerprint.
    """

    name: str
    tokenizer: Callable[[list[str]], torch.Tensor]
    source: str = "txt"
    choose: str = "all"
    min_words: int = 0
    tokenizer_name: str = ""
    fallback: str = ""

    def __post_init__(self) -> None:
        _check_name("text field", self.name)
        if not callable(self.tokenizer):
            raise ValueError(f"text field '{self.name}': tokenizer must be callable")
        for source in (self.source, self.fallback) if self.fallback else (self.source,):
            try:
                TextSource.parse(source)
            except ValueError as error:
                raise ValueError(f"text field '{self.name}': {error}") from None
        if self.choose not in CHOICES:
            raise ValueError(
                f"text field '{self.name}': choose must be one of {CHOICES}, got {self.choose!r}"
            )
        if self.min_words < 0:
            raise ValueError(f"text field '{self.name}': min_words must be >= 0")

    @property
    def sources(self) -> tuple[TextSource, ...]:
        """The parsed source, then the fallback if any."""
        return tuple(TextSource.parse(s) for s in (self.source, self.fallback) if s)

    @property
    def json_key(self) -> str | None:
        """The json key the text comes from, or None when it is a tar member."""
        return self.sources[0].json_key

    def pick(self, text: str, seed: int) -> str:
        """The text this field uses from the sample's ``text``, drawn with ``seed``.

        Raises:
            SampleError: no sentence (or text) of at least ``min_words`` words.
        """
        if self.choose == "all":
            candidates = [text]
        else:  # imported on use: only sentence fields need the splitter
            from data_pipelines.sentences import split_sentences

            candidates = split_sentences(text)
        kept = [c for c in candidates if len(c.split()) >= self.min_words]
        if not kept:
            raise SampleError(
                f"text field '{self.name}' ({self.source}): no "
                f"{'sentence' if self.choose == 'sentence' else 'text'} of at least "
                f"{self.min_words} words in {text[:80]!r}"
            )
        return kept[random.Random(seed).randrange(len(kept))] if len(kept) > 1 else kept[0]

    def fingerprint(self) -> tuple[str | int, ...]:
        """What about this field changes the stream's batches."""
        splitter = ""
        if self.choose == "sentence":
            from data_pipelines.sentences import SPLITTER

            splitter = SPLITTER
        parts: tuple[str | int, ...] = ("text", self.name, self.source, self.choose,
                                        self.min_words, self.tokenizer_name, splitter)  # fmt: skip
        return (*parts, self.fallback) if self.fallback else parts


@dataclass(frozen=True)
class JsonField:
    """The value of key ``source`` of the sample's json, under batch key ``name``, collated by
    :func:`collate_json`. A sample without the key is skipped and counted as bad data.

    ``item``: the value is a list of objects and the field takes key ``item`` of each
    (``source="objects", item="box"``: the boxes, padded with a mask).
    """

    name: str
    source: str
    item: str = ""

    def __post_init__(self) -> None:
        _check_name("json field", self.name)
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"json field '{self.name}': source must be a json key")

    def fingerprint(self) -> tuple[str, ...]:
        """What about this field changes the stream's batches."""
        return ("json", self.name, self.source, *((self.item,) if self.item else ()))


@dataclass(frozen=True)
class ArrayField:
    """A ``.npy`` member of the sample (``member``, e.g. ``regions.npy``: a 2-D ``[n, d]`` array,
    such as a detector's region features), under batch key ``name``: float32 ``[b, n, d]``
    zero-padded to the longest ``n`` of the batch, with ``<name>_mask`` (:func:`collate_arrays`).
    Read without pickle; a sample without the member, or whose array is not 2-D numbers, is
    skipped and counted as bad data."""

    name: str
    member: str

    def __post_init__(self) -> None:
        _check_name("array field", self.name)
        if not isinstance(self.member, str) or not self.member.endswith(".npy"):
            raise ValueError(f"array field '{self.name}': member must end in .npy")


@dataclass(frozen=True)
class SidecarField:
    """A per-sample tensor looked up by sample key in a sidecar file beside the shards
    (``path``, :mod:`data_pipelines.sidecar`: sorted keys and one ``[N, ...]`` array,
    memory-mapped), under batch key ``name``, stacked.

    Precomputed per-sample values (PRIOR's reference log-probabilities, ProtoCLIP's teacher)
    travel this way. The file's size and its ``id`` metadata (written with it) join the resume
    fingerprint, so a resume against a recomputed sidecar is refused. A sample the file lacks
    is skipped and counted as bad data.
    """

    name: str
    path: str

    def __post_init__(self) -> None:
        _check_name("sidecar field", self.name)
        if not str(self.path).endswith(".safetensors"):
            raise ValueError(f"sidecar field '{self.name}': path must be a .safetensors file")

    def fingerprint(self) -> tuple[str, ...]:
        """Name, path, file size and the file's ``id``: what identifies its values (a file
        converted from the old format keeps the old file's size and ``id``)."""
        metadata = sidecar_metadata(self.path)
        size = metadata.get(CONVERTED_SIZE_KEY) or str(os.path.getsize(self.path))
        return ("sidecar", self.name, str(self.path), size, metadata.get("id", ""))

    def lookup(self, key: str) -> torch.Tensor:
        """The tensor of sample ``key`` (a binary search of the file's sorted keys); SampleError
        when the file lacks it."""
        value = open_sidecar(str(self.path)).get(key)
        if value is None:
            raise SampleError(f"sample key '{key}' is not in sidecar {self.path}")
        return value


@dataclass(frozen=True)
class BatchFields:
    """Everything a batch carries besides ``__key__``; see the module docstring for the keys.

    Raises:
        ValueError: no view, or two batch keys clash (names, ``<json>_mask``, ``__key__``).
    """

    views: tuple[ImageView, ...]
    texts: tuple[TextField, ...] = ()
    json: tuple[JsonField, ...] = ()
    arrays: tuple[ArrayField, ...] = ()
    sidecars: tuple[SidecarField, ...] = ()

    def __post_init__(self) -> None:
        for attr in (
            "views",
            "texts",
            "json",
            "arrays",
            "sidecars",
        ):  # lists are accepted; stored as tuples
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        if not self.views:
            raise ValueError("BatchFields needs at least one image view")
        self.batch_keys()

    @classmethod
    def single(
        cls,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        source: str = "txt",
    ) -> BatchFields:
        """Today's batch: one view ``image`` and one text ``text`` (the whole text)."""
        return cls(
            views=(ImageView("image", transform),), texts=(TextField("text", tokenizer, source),)
        )

    def views_take_arrays(self) -> bool:
        """Whether every view's transform also takes the uint8 ``[H, W, 3]`` arrays of
        :func:`~data_pipelines.decode.decode_for_transforms` (it says so with a true
        ``takes_arrays``): then the stream decodes JPEGs straight into arrays, the same pixels
        at a lower cost. A transform that does not say so gets PIL images, as always."""
        return all(getattr(v.transform, "takes_arrays", False) for v in self.views)

    def plain_source(self) -> str | None:
        """The text source if these fields are exactly :meth:`single`'s (no preset, no
        tokenizer name): such a stream is today's, with today's fingerprint. Else None."""
        if (
            len(self.views) != 1
            or len(self.texts) != 1
            or self.json
            or self.arrays
            or self.sidecars
        ):
            return None
        view, text = self.views[0], self.texts[0]
        plain_view = view.name == "image" and not view.preset
        plain_text = (text.name, text.choose, text.min_words, text.tokenizer_name) == ("text", "all", 0, "")  # fmt: skip
        return text.source if plain_view and plain_text else None

    def batch_keys(self) -> tuple[str, ...]:
        """The keys these fields put into a batch, ``__key__`` included.

        Raises:
            ValueError: a key is used twice, naming it and its users.
        """
        users: dict[str, list[str]] = {k: ["the stream"] for k in STREAM_KEYS}
        named = [(v.name, f"image view '{v.name}'") for v in self.views]
        named += [(t.name, f"text field '{t.name}'") for t in self.texts]
        named += [
            (fallback_key(t.name), f"the fallback flags of text field '{t.name}'")
            for t in self.texts
            if t.fallback
        ]
        named += [(j.name, f"json field '{j.name}'") for j in self.json]
        named += [(mask_key(j.name), f"the mask of json field '{j.name}'") for j in self.json]
        named += [(a.name, f"array field '{a.name}'") for a in self.arrays]
        named += [(c.name, f"sidecar field '{c.name}'") for c in self.sidecars]
        named += [(mask_key(a.name), f"the mask of array field '{a.name}'") for a in self.arrays]
        for key, user in named:
            users.setdefault(key, []).append(user)
        clashes = {k: u for k, u in users.items() if len(u) > 1}
        if clashes:
            detail = "; ".join(f"'{k}' is used by {' and '.join(u)}" for k, u in clashes.items())
            raise ValueError(f"batch keys clash: {detail}; rename the fields")
        return tuple(k for k in users if k != "__stream__")

    def required_members(self) -> frozenset[str]:
        """Tar members the stream reads besides the image (``json`` if any value comes from it)."""
        members = {s.key for t in self.texts for s in t.sources if s.kind == "member"}
        members |= {a.member for a in self.arrays}
        if self.required_json_keys():
            members.add("json")
        return frozenset(members)

    def required_json_keys(self) -> frozenset[str]:
        """Keys of the sample's json that the stream reads."""
        keys = {s.key for t in self.texts for s in t.sources if s.json_key is not None}
        return frozenset(keys | {j.source for j in self.json})

    def fingerprint_parts(self) -> FingerprintParts:
        """What changes what the stream reads and yields: names, sources, presets, tokenizer
        names, choice rules (and the sentence splitter's version), in order. JSON-ready."""
        return (
            *(("view", v.name, v.preset) for v in self.views),
            *(t.fingerprint() for t in self.texts),
            *(j.fingerprint() for j in self.json),
            *(("array", a.name, a.member) for a in self.arrays),
            *(c.fingerprint() for c in self.sidecars),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _dtype(values: Sequence[Any]) -> torch.dtype:
    if values and all(isinstance(v, bool) for v in values):
        return torch.bool
    return torch.long if all(isinstance(v, int) for v in values) and values else torch.float32


def _mask(lists: Sequence[Sequence[Any]], longest: int) -> torch.Tensor:
    lengths = torch.tensor([len(v) for v in lists])
    return torch.arange(longest)[None, :] < lengths[:, None]


def _padded(lists: Sequence[list[Any]], flat: list[Any], inner: tuple[int, ...]) -> torch.Tensor:
    longest = max((len(v) for v in lists), default=0)
    dtype = _dtype([x for item in flat for x in item] if inner else flat)
    out = torch.zeros((len(lists), longest, *inner), dtype=dtype)
    for i, values in enumerate(lists):
        if values:
            out[i, : len(values)] = torch.tensor(values, dtype=dtype)
    return out


def collate_arrays(name: str, arrays: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's ``[n_i, d]`` arrays -> ``{name: [b, max n_i, d], <name>_mask: [b, max n_i]}``.

    Raises:
        ValueError: the arrays' widths ``d`` differ within the batch.
    """
    widths = {int(a.shape[1]) for a in arrays}
    if len(widths) > 1:
        raise ValueError(f"array field '{name}': widths {sorted(widths)} differ within a batch")
    longest = max((len(a) for a in arrays), default=0)
    out = torch.zeros(len(arrays), longest, widths.pop() if widths else 0)
    for i, array in enumerate(arrays):
        out[i, : len(array)] = array
    lengths = torch.tensor([len(a) for a in arrays])
    return {name: out, mask_key(name): torch.arange(longest)[None, :] < lengths[:, None]}


def collate_json(name: str, values: Sequence[Any]) -> dict[str, Any]:
    """A batch's values of JSON field ``name`` -> ``{name: ...}`` (and ``{name}_mask``).

    - numbers -> tensor ``[b]`` (long if all ints, bool if all bools, else float32);
    - lists of numbers (tags as ids) -> ``[b, n]`` and lists of equal-length number lists
      (boxes) -> ``[b, n, k]``, zero-padded to the longest list ``n`` in the batch, with a bool
      mask ``[b, n]`` (True = real entry) under ``{name}_mask``. A batch of empty lists gives
      ``[b, 0]`` float32;
    - lists of strings -> list of lists padded with ``""``, with the same mask;
    - anything else (strings, dicts, mixed lists) -> the python list of the values.
    """
    if values and all(_is_number(v) for v in values):
        return {name: torch.tensor(list(values), dtype=_dtype(values))}
    if values and all(isinstance(v, list) for v in values):
        flat = [x for v in values for x in v]
        longest = max(len(v) for v in values)
        if all(_is_number(x) for x in flat):
            return {name: _padded(values, flat, ()), mask_key(name): _mask(values, longest)}
        rows = all(isinstance(x, list) and all(_is_number(y) for y in x) for x in flat)
        if rows and len({len(x) for x in flat}) == 1:
            padded = _padded(values, flat, (len(flat[0]),))
            return {name: padded, mask_key(name): _mask(values, longest)}
        if all(isinstance(x, str) for x in flat):
            texts = [list(v) + [""] * (longest - len(v)) for v in values]
            return {name: texts, mask_key(name): _mask(values, longest)}
    return {name: list(values)}
