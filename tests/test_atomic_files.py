"""vlp.atomic_files: a temporary beside the target, then os.replace; the old target survives a
failed write, nothing is left behind, and what lands has the umask's permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlp import atomic_files
from vlp.atomic_files import atomic_path, atomic_write_text


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_text_replaces_the_target_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    assert atomic_write_text(target, "new") == target
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_target_and_removes_the_temporary(tmp_path) -> None:
    target = tmp_path / "w.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_the_temporary_is_a_hidden_sibling_that_no_glob_picks_up(tmp_path) -> None:
    with atomic_path(tmp_path / "r.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".r.json.")
        assert tmp.suffix == ".tmp" and not tmp.exists()
        assert list(tmp_path.glob("*.json")) == []
        tmp.write_text("{}")


def test_nothing_written_is_an_error_and_the_target_is_untouched(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(tmp_path / "x"):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_a_plain_open_gives(tmp_path, umask, mode) -> None:
    """A writer that makes its file 0600 (mkstemp, safetensors) still lands as open() would."""
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
            tmp.chmod(0o600)
        atomic_write_text(tmp_path / "b.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.txt") == mode
    assert _mode(tmp_path / "plain.txt") == mode


def test_a_folder_lands_whole_with_normal_permissions(tmp_path, umask_022) -> None:
    target = tmp_path / "export"
    target.mkdir()  # an empty target folder is replaced
    with atomic_path(target) as staging:
        staging.mkdir(mode=0o700)
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "weights").write_bytes(b"w")
        (staging / "sub" / "weights").chmod(0o600)
        (staging / "run.sh").write_text("#!/bin/sh\n")
        (staging / "run.sh").chmod(0o700)
        (staging / "link").symlink_to("run.sh")
    assert (target / "sub" / "weights").read_bytes() == b"w"
    assert _mode(target) == _mode(target / "sub") == 0o755
    assert _mode(target / "sub" / "weights") == 0o644
    assert _mode(target / "run.sh") == 0o755  # executables stay executable
    assert (target / "link").is_symlink()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_failed_folder_write_is_removed(tmp_path) -> None:
    with pytest.raises(OSError, match="no space"), atomic_path(tmp_path / "export") as staging:
        staging.mkdir()
        (staging / "part").write_text("x")
        raise OSError(28, "no space")
    assert list(tmp_path.iterdir()) == []


def test_durable_syncs_the_data_before_the_rename_and_the_parent_after(
    tmp_path, monkeypatch
) -> None:
    events: list[str] = []
    real_fsync_path, real_replace = atomic_files.fsync_path, os.replace
    monkeypatch.setattr(
        atomic_files, "fsync_path", lambda p: (events.append(Path(p).name), real_fsync_path(p))[1]
    )
    monkeypatch.setattr(
        atomic_files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    atomic_write_text(tmp_path / "r.json", "{}", durable=True)
    assert events[-2:] == ["replace", tmp_path.name]
    assert events[0].startswith(".r.json.") and events[0].endswith(".tmp")
    events.clear()
    atomic_write_text(tmp_path / "s.json", "{}")
    assert events == ["replace"]  # not durable: no fsync


def test_umask_reads_the_process_umask_and_leaves_it(umask_022) -> None:
    assert atomic_files.umask() == 0o022
    os.umask(0o027)
    assert atomic_files.umask() == 0o027
    assert atomic_files.umask() == 0o027


def test_import_is_light() -> None:
    """Every package may import it: it must not pull in torch (or anything of vlp)."""
    code = (
        "import sys, vlp.atomic_files, vlp.run_folder; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert {m for m in sys.modules if m.startswith('vlp')} == "
        "{'vlp', 'vlp.atomic_files', 'vlp.run_folder'}"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
