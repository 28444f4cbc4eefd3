"""The tar member reader (``data_pipelines.tario``) against Python's ``tarfile``, its reference.

Random archives written by ``tarfile`` in GNU, ustar and pax formats (long and non-ASCII names,
float and int mtimes, directories, symlinks and hard links between the files, empty members,
sizes around the 512-byte blocks, pax global headers) must read as ``tarfile``'s ``r|*`` reads
them: the same regular members, samples, keys and indexes; cut at any byte or with any byte
changed, the same samples before the same kind of outcome, except where ``tarfile`` ends
quietly without the end-of-archive block (a cut between members or inside a header, a damaged
header after the first member): there the reader raises, after the same samples.
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from data_pipelines import tario
from data_pipelines.decode import DATA_ERRORS
from data_pipelines.tario import RawSample, iter_keys, iter_samples

SEEDS = range(24)
FORMATS = {"gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT}
SIZES = (0, 1, 100, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049)


def _reference_samples(stream: Any, url: str) -> Iterator[RawSample]:
    """``iter_samples`` as it was before the header parser: ``tarfile``'s streaming reader."""
    key: str | None = None
    members: dict[str, bytes] = {}
    index = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            parts = tario._split(info.name)
            if parts is None:
                continue
            handle = tar.extractfile(info)
            data = handle.read() if handle is not None else b""
            if len(data) != info.size:
                raise EOFError(f"member {info.name} truncated")
            if parts[0] != key or parts[1] in members:
                if key is not None:
                    yield RawSample(key, members, url, index)
                    index += 1
                key, members = parts[0], {}
            members[parts[1]] = data
    if key is not None:
        yield RawSample(key, members, url, index)


def _name(rng: random.Random, fmt: str, i: int) -> str:
    """A member name: mostly ``key.suffix`` sample members, some long, non-ASCII, odd ones."""
    key = f"{rng.randrange(6):03d}"
    suffix = rng.choice(["jpg", "txt", "json", "seg.png", "CLS", "jpg"])
    kind = rng.random()
    if kind < 0.15:  # longer than the 100-byte name field
        folder = "/".join(
            f"dir{j}_{'x' * rng.randrange(5, 40)}" for j in range(rng.randrange(1, 5))
        )
        name = f"{folder}/{key}{'k' * rng.randrange(60, 120)}.{suffix}"
        return name if fmt != "ustar" or len(name.rsplit("/", 1)[-1]) < 100 else f"{key}.{suffix}"
    if kind < 0.25:
        return f"cafés/ключ_{key}.{suffix}"
    if kind < 0.3:
        return rng.choice([f"__meta{i}__.json", f"README{i}", f"sub/__{key}.txt"])
    return f"{key}.{suffix}"


def _archive(seed: int, fmt: str) -> bytes:
    """A random archive of ``fmt``, written by ``tarfile``."""
    rng = random.Random(f"{seed}-{fmt}")
    out = io.BytesIO()
    globals_ = {"comment": "written by a test"} if fmt == "pax" and rng.random() < 0.3 else None
    with tarfile.open(fileobj=out, mode="w", format=FORMATS[fmt], pax_headers=globals_) as tar:
        for i in range(rng.randrange(0, 30)):
            name = _name(rng, fmt, i)
            info = tarfile.TarInfo(name)
            info.mtime = rng.choice([0, 1_700_000_000, 1_700_000_000.25, 0.0])
            roll = rng.random()
            if roll < 0.08:
                info.type, info.name = tarfile.DIRTYPE, name.rsplit(".", 1)[0] + "/"
            elif roll < 0.14:
                info.type, info.linkname = tarfile.SYMTYPE, "target/" + "t" * rng.randrange(120)
            elif roll < 0.17:
                info.type, info.linkname = tarfile.LNKTYPE, name
            if info.type != tarfile.REGTYPE:
                try:
                    tar.addfile(info)
                except ValueError:  # a name ustar cannot hold
                    pass
                continue
            size = rng.choice(SIZES) if rng.random() < 0.7 else rng.randrange(4000)
            info.size = size
            try:
                tar.addfile(info, io.BytesIO(rng.randbytes(size)))
            except ValueError:
                pass
    return out.getvalue()


def _tarfile_members(data: bytes) -> tuple[list[tuple[str, bytes]], str]:
    """``tarfile``'s regular members of ``data`` and how reading ended."""
    got: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for member in tar:
                if member.isreg():
                    got.append((member.name, tar.extractfile(member).read()))  # type: ignore[union-attr]
    except tarfile.TarError:
        return got, "error"
    return got, "end"


def _members(data: bytes) -> tuple[list[tuple[str, bytes]], str]:
    """The parser's regular members of ``data`` and how reading ended."""
    got: list[tuple[str, bytes]] = []
    try:
        for name, _, member in tario._members(io.BytesIO(data), lambda n: (n, ""), read=True):
            got.append((name, member))
    except tarfile.TarError:
        return got, "error"
    return got, "end"


def _outcome(read: Any, data: bytes) -> tuple[list[tuple[str, int, dict[str, bytes]]], str]:
    """The samples a reader yields from ``data``, and how it ended: "end" or "error"."""
    got: list[tuple[str, int, dict[str, bytes]]] = []
    try:
        for sample in read(io.BytesIO(data), "u"):
            got.append((sample.key, sample.index, sample.members))
    except (tarfile.TarError, EOFError) as error:
        assert isinstance(error, DATA_ERRORS)
        return got, "error"
    return got, "end"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", SEEDS)
def test_members_samples_and_keys_equal_tarfiles(seed: int, fmt: str) -> None:
    data = _archive(seed, fmt)
    members, ended = _members(data)
    assert (members, ended) == _tarfile_members(data)
    if ended == "end":
        ours = list(iter_samples(io.BytesIO(data), "u"))
        assert ours == list(_reference_samples(io.BytesIO(data), "u"))
        assert list(iter_keys(io.BytesIO(data))) == [s.key for s in ours]


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
@pytest.mark.parametrize("seed", SEEDS)
def test_a_cut_or_changed_archive_gives_what_tarfile_gives(seed: int, fmt: str) -> None:
    data = _archive(seed, fmt)
    rng = random.Random(seed)
    cuts = {0, 1, 511, 512, 513, len(data) - 1, *(rng.randrange(len(data)) for _ in range(40))}
    end = _end_of_archive(data)
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        ours, reference = (
            _outcome(iter_samples, data[:cut]),
            _outcome(_reference_samples, data[:cut]),
        )
        assert ours[0] == reference[0], cut
        assert ours[1] == ("error" if cut < end + 512 else reference[1]), cut  # no quiet end
    for _ in range(40):
        at = rng.randrange(len(data))
        changed = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
        ours, reference = _outcome(iter_samples, changed), _outcome(_reference_samples, changed)
        assert ours[0] == reference[0], at
        if ours != reference:  # a header tarfile takes for the quiet end of the archive
            assert (ours[1], reference[1]) == ("error", "end"), at


def _end_of_archive(data: bytes) -> int:
    """Where ``data``'s end-of-archive zero blocks start (its members' data is random bytes)."""
    return -(-len(data.rstrip(b"\0")) // 512) * 512


@pytest.mark.parametrize("cut", ["between members", "inside a header", "damaged header"])
def test_an_archive_that_stops_before_its_end_block_is_an_error_naming_the_last_member(
    cut: str,
) -> None:
    """Before: these ended the shard quietly (as ``tarfile`` does), and the training stream
    lost the samples after the damage without counting them."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("000.jpg", "000.txt", "001.jpg", "001.txt"):
            info = tarfile.TarInfo(name)
            info.size = 700
            tar.addfile(info, io.BytesIO(bytes(700)))
    data = out.getvalue()
    second = 2 * (512 + 1024)  # the header of 001.jpg
    damaged = {
        "between members": data[:second],
        "inside a header": data[: second + 100],
        "damaged header": data[:second] + b"x" * 512 + data[second + 512 :],
    }[cut]
    error = tario.DamagedHeader if cut == "damaged header" else tario.ArchiveCut
    assert issubclass(error, DATA_ERRORS)
    with pytest.raises(error, match=r"member 000\.txt"):
        list(tario._members(io.BytesIO(damaged), tario._split, read=True))
    samples: list[RawSample] = []
    with pytest.raises(error):
        samples.extend(iter_samples(io.BytesIO(damaged), "u"))
    assert [s.key for s in samples] == ["000"]  # its members are whole: yielded, then the error
    keys: list[str] = []
    with pytest.raises(error):
        keys.extend(iter_keys(io.BytesIO(damaged)))
    assert keys == ["000"]


def test_a_cut_member_is_named() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("000.jpg")
        info.size = 2000
        tar.addfile(info, io.BytesIO(bytes(2000)))
    with pytest.raises(EOFError, match=r"member 000\.jpg truncated \(988 of 2000 bytes\)"):
        list(iter_samples(io.BytesIO(out.getvalue()[:1500]), "u"))
    with pytest.raises(tarfile.ReadError):
        list(iter_samples(io.BytesIO(b"this is not a tar file" * 30), "u"))


def test_gzip_tars_are_read_by_tarfile() -> None:
    data = _archive(3, "pax")
    packed = gzip.compress(data)
    assert list(iter_samples(io.BytesIO(packed), "u")) == list(
        _reference_samples(io.BytesIO(data), "u")
    )
    assert list(iter_keys(io.BytesIO(packed))) == list(iter_keys(io.BytesIO(data)))


class _CountingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


def test_per_member_work_is_a_few_reads_and_no_tarinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member costs at most three reads (header, data, padding) and no ``TarInfo`` object;
    a pax shard one header block and two reads more."""
    for fmt, most in (("ustar", 3), ("pax", 6)):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=FORMATS[fmt]) as tar:
            for i in range(50):
                info = tarfile.TarInfo(f"{i // 2:05d}.{('jpg', 'txt')[i % 2]}")
                info.size, info.mtime = 700, 0.5  # a float mtime: pax writes a header each
                tar.addfile(info, io.BytesIO(bytes(700)))
        stream = _CountingStream(out.getvalue())
        monkeypatch.setattr(tarfile, "TarInfo", None)
        assert len(list(iter_samples(stream, "u"))) == 25
        monkeypatch.undo()
        assert stream.reads <= 50 * most + 1, fmt
