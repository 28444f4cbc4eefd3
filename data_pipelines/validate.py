"""Read every sample of a set of shards and report what the training stream would trip over.

``vlp shards validate`` runs this before a long job. A sample is checked with the stream's own
rules (:mod:`data_pipelines.decode`), so "valid" here means "decodes in training". A shard is
checked as a tar: one that does not open, and one that is truncated (a read error: the
streaming tar reader ``tario`` raises where a tar stops before its end-of-archive block; or an
uncompressed tar whose end lacks the second of the marker's two zero blocks, which the reader
does not need) are reported, and so is a sample count that disagrees with
``sizes.json``. A json member's ``summary`` and ``objects`` keys, where present, are checked
with ``vlp shards attach``'s rules (:func:`data_pipelines.object_fields.check_fields`). A
warning (not a problem) says when most shards hold a single class (``cls``): shards written in
class order, whose batches would hold one or two classes when the stream's shuffle buffer holds
about a shard; write them shuffled (``vlp shards write`` does by default).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import webdataset as wds

from data_pipelines.decode import (
    DATA_ERRORS,
    DEFAULT_MAX_PIXELS,
    IMAGE_MEMBERS,
    SampleError,
    decode_caption,
    decode_image,
)
from data_pipelines.object_fields import FieldError, check_fields
from data_pipelines.shards import Urls, expand_patterns, listed_shards, listed_sizes
from data_pipelines.tario import iter_samples

PROBLEM_KINDS = (
    "unreadable_shard",
    "truncated_shard",
    "size_mismatch",
    "duplicate_key",
    "missing_image",
    "undecodable_image",
    "missing_caption",
    "empty_caption",
    "caption_not_utf8",
    "bad_summary",
    "bad_objects",
)
_END_OF_ARCHIVE = b"\0" * 1024
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gz bz2 xz zstd
_SIZES_JSON_ERRORS: tuple[type[BaseException], ...] = (*DATA_ERRORS, ValueError)  # bad JSON


@dataclass
class Problem:
    """One thing wrong: its kind (one of ``PROBLEM_KINDS``), the sample key if any, details."""

    kind: str
    key: str | None
    detail: str


@dataclass
class ShardReport:
    """What was found in one shard: samples read, the ``sizes.json`` count, the problems."""

    url: str
    samples: int = 0
    listed: int | None = None
    problems: list[Problem] = field(default_factory=list)
    classes: int | None = None
    """Distinct ``cls`` values in the shard (None: its samples have no ``cls``)."""


@dataclass
class ValidationReport:
    """Per-shard reports of one validation run, in shard order, and problems of the whole set
    (an unreadable ``sizes.json``)."""

    shards: list[ShardReport]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What may hurt training without being an error (label-homogeneous shards)."""

    @property
    def ok(self) -> bool:
        """True when nothing has a problem."""
        return not self.problems and not any(shard.problems for shard in self.shards)

    @property
    def samples(self) -> int:
        """Samples read over all shards (bad ones included)."""
        return sum(shard.samples for shard in self.shards)

    def problem_counts(self) -> dict[str, int]:
        """Number of problems of each kind that occurred."""
        counts = Counter(p.kind for shard in self.shards for p in shard.problems)
        counts.update(p.kind for p in self.problems)
        return {kind: counts[kind] for kind in PROBLEM_KINDS if counts[kind]}

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-able data (``vlp shards validate --json``)."""
        return {
            "ok": self.ok,
            "shards": len(self.shards),
            "samples": self.samples,
            "problems": self.problem_counts(),
            "set_problems": [asdict(problem) for problem in self.problems],
            "warnings": list(self.warnings),
            "shard_reports": [asdict(shard) for shard in self.shards],
        }


class _TailReader(io.RawIOBase):
    """Pass a binary stream through, keeping its first 512 bytes, its last 1024 and its length."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.head, self.tail, self.length = raw, b"", b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        if len(self.head) < 512:
            self.head = (self.head + data)[:512]
        self.tail = (self.tail + data)[-1024:]
        self.length += len(data)
        return len(data)

    def starts_archive(self) -> bool:
        """Whether the stream starts with a valid tar header (compressed: assume so)."""
        if self.head.startswith(_COMPRESSED_MAGIC):
            return True
        try:
            tarfile.TarInfo.frombuf(self.head, "utf-8", "surrogateescape")
        except tarfile.TarError:
            return False
        return True

    def ends_archive(self) -> bool:
        """Whether what was read ends like a complete uncompressed tar (compressed: assume so,
        the decompressor reports truncation itself)."""
        if self.head.startswith(_COMPRESSED_MAGIC):
            return True
        return self.length % 512 == 0 and self.tail == _END_OF_ARCHIVE


def _check_json_fields(data: bytes, key: str) -> list[Problem]:
    """A problem when the json's ``summary`` or ``objects`` break their format; a json member
    that is not a JSON object is not checked (the stream reads it only for json fields)."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting ([[[[...)
        return []
    if not isinstance(meta, dict):
        return []
    try:
        check_fields(meta)
    except FieldError as error:
        return [Problem(f"bad_{error.field}", key, str(error))]
    return []


def _check_sample(
    members: dict[str, bytes], key: str, caption_key: str, max_pixels: int
) -> list[Problem]:
    problems = []
    image_key = next((k for k in IMAGE_MEMBERS if k in members), None)
    if image_key is None:
        problems.append(Problem("missing_image", key, f"members: {sorted(members)}"))
    else:
        try:
            decode_image(members[image_key], max_pixels=max_pixels)
        except SampleError as error:
            problems.append(Problem("undecodable_image", key, f"{image_key}: {error}"))
    if caption_key not in members:
        problems.append(Problem("missing_caption", key, f"no {caption_key!r} member"))
    else:
        try:
            decode_caption(members[caption_key])
        except SampleError as error:
            not_utf8 = isinstance(error.__cause__, UnicodeDecodeError)
            kind = "caption_not_utf8" if not_utf8 else "empty_caption"
            problems.append(Problem(kind, key, str(error)))
    if "json" in members:
        problems += _check_json_fields(members["json"], key)
    return problems


def validate_shard(
    url: str,
    *,
    caption_key: str = "txt",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seen: dict[str, str] | None = None,
) -> ShardReport:
    """Read every sample of one shard and report its problems.

    ``seen`` maps keys already met (in earlier shards) to their shard; it is updated, so one
    dict passed over a whole dataset also finds keys duplicated across shards.
    """
    seen = {} if seen is None else seen
    report = ShardReport(url)
    classes: set[bytes] = set()
    try:
        raw = wds.gopen(url)
    except DATA_ERRORS as error:
        report.problems.append(Problem("unreadable_shard", None, f"does not open: {error!r}"))
        return report
    tail = _TailReader(raw)
    try:
        stream = io.BufferedReader(tail)
        for sample in iter_samples(stream, url):
            report.samples += 1
            if sample.key in seen:
                where = "earlier in this shard" if seen[sample.key] == url else seen[sample.key]
                report.problems.append(Problem("duplicate_key", sample.key, f"also {where}"))
            seen.setdefault(sample.key, url)
            if "cls" in sample.members:
                classes.add(sample.members["cls"].strip())
                report.classes = len(classes)
            report.problems += _check_sample(sample.members, sample.key, caption_key, max_pixels)
        while stream.read(1 << 16):  # the end-of-archive blocks and record padding
            pass
    except DATA_ERRORS as error:
        if not tail.starts_archive():
            detail = f"does not open as a tar: {error!r}"
            report.problems.append(Problem("unreadable_shard", None, detail))
        else:
            detail = f"read error after {report.samples} samples: {error!r}"
            report.problems.append(Problem("truncated_shard", None, detail))
        return report
    finally:
        raw.close()
    if not tail.ends_archive():
        detail = f"no end-of-archive blocks after {report.samples} samples: the tar was cut short"
        report.problems.append(Problem("truncated_shard", None, detail))
    return report


def _shard_list(urls: Urls) -> tuple[list[str], list[int | None], list[Problem]]:
    """The shards to check, their ``sizes.json`` counts, and the problem of an unreadable
    ``sizes.json`` if there is one.

    For a folder, the shards its ``sizes.json`` lists are checked even if absent, so that a
    missing shard is reported instead of silently ignored.
    """
    shards = expand_patterns(urls)
    target = os.fspath(urls) if isinstance(urls, (str, os.PathLike)) else None
    try:
        if target is not None and os.path.isdir(target):
            shards = sorted(set(shards) | set(listed_shards(target)))
        return shards, listed_sizes(shards), []
    except _SIZES_JSON_ERRORS as error:
        problem = Problem("size_mismatch", None, f"sizes.json cannot be read: {error!r}")
        return shards, [None] * len(shards), [problem]


def validate_shards(
    urls: Urls, *, caption_key: str = "txt", max_pixels: int = DEFAULT_MAX_PIXELS
) -> ValidationReport:
    """Check every sample of every shard (a folder, brace pattern or list of URLs).

    Keys are checked for duplicates across all shards; shard counts are compared with their
    ``sizes.json``. Raises ``FileNotFoundError`` when nothing matches ``urls`` (a usage error,
    unlike a listed shard that is missing, which is a problem in the report).
    """
    shards, listed_counts, problems = _shard_list(urls)
    seen: dict[str, str] = {}
    reports = []
    for url, listed in zip(shards, listed_counts, strict=True):
        report = validate_shard(url, caption_key=caption_key, max_pixels=max_pixels, seen=seen)
        report.listed = listed
        read_whole = not any(p.kind.endswith("_shard") for p in report.problems)
        if listed is not None and read_whole and listed != report.samples:
            detail = f"sizes.json lists {listed} samples, the shard has {report.samples}"
            report.problems.append(Problem("size_mismatch", None, detail))
        reports.append(report)
    return ValidationReport(reports, problems, _label_warnings(reports))


def _label_warnings(reports: list[ShardReport]) -> list[str]:
    """A warning when most shards with labels (and more than one sample) hold one class."""
    labelled = [r for r in reports if r.classes is not None and r.samples > 1]
    single = [r for r in labelled if r.classes == 1]
    if len(labelled) < 2 or 2 * len(single) <= len(labelled):
        return []
    return [
        f"{len(single)} of {len(labelled)} shards hold a single class (cls): the shards look "
        "written in class order, so a shuffle buffer of about a shard gives batches of one or "
        "two classes; rewrite them shuffled (vlp shards write shuffles by default) or read "
        "several shards at once (data shards_in_flight)"
    ]


def format_report(report: ValidationReport, max_per_shard: int = 10) -> str:
    """The report as text for people: one line per shard, its first problems, a total."""
    lines = [f"{problem.kind}: {problem.detail}" for problem in report.problems]
    lines += [f"warning: {warning}" for warning in report.warnings]
    for shard in report.shards:
        listed = (
            f" (sizes.json: {shard.listed})" if shard.listed not in (None, shard.samples) else ""
        )
        status = f"{len(shard.problems)} problems" if shard.problems else "ok"
        lines.append(f"{shard.url}: {shard.samples} samples{listed}, {status}")
        for problem in shard.problems[:max_per_shard]:
            key = f" {problem.key}" if problem.key is not None else ""
            lines.append(f"  {problem.kind}{key}: {problem.detail}")
        if len(shard.problems) > max_per_shard:
            lines.append(f"  ... and {len(shard.problems) - max_per_shard} more (see --json)")
    counts = ", ".join(f"{kind} {n}" for kind, n in report.problem_counts().items())
    verdict = f"problems: {counts}" if counts else "no problems"
    lines.append(f"{len(report.shards)} shards, {report.samples} samples, {verdict}")
    return "\n".join(lines)
