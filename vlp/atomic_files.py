"""Atomic writes: the new file (or folder) is made under a temporary name beside the target,
then renamed onto it with ``os.replace``.

A reader (a resume, a results table, a sweep's skip-existing check, another rank) therefore
sees the old target or the whole new one, never a half-written file, even when the writer is
killed mid-write; a write that raises removes its temporary. The temporary is a hidden sibling
(``.NAME.<random>.tmp``), so it is on the same filesystem (the rename is atomic on POSIX) and
no ``*.json``/``*.safetensors`` glob picks it up.

What lands gets the permissions a plain ``open()``/``mkdir`` would give: 0666 for files (0777
for folders and executables), less the umask. ``tempfile.mkstemp``/``mkdtemp`` and safetensors'
``save_file`` make 0600/0700 entries, which teammates cannot read under the usual umask 0022.

``durable=True`` also flushes the data to disk (``fsync`` of the file, or of every file and
folder of a tree, before the rename, and of the parent folder after it), so the rename survives
a power loss; without it the write is atomic for readers but not durable.

This module imports nothing from vlp, so every package (``vlp``, ``data_pipelines``, ``evals``,
``launch``) may use it. Example::

    with atomic_path(out) as tmp:  # any writer that takes a path
        save_file(tensors, str(tmp))
    atomic_write_text(run / "result.json", json.dumps(record))
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on a normal exit, move it onto ``path``.

    The body creates a file or a folder at the yielded path (it does not exist yet). On a
    normal exit its permissions are normalised (see the module docstring) and it replaces
    ``path``; an existing file is replaced atomically, and so is an empty folder (remove a
    non-empty target folder at the end of the body). If the body raises, or nothing was
    written, the temporary is removed and ``path`` is left as it was. The parent folder must
    exist.

    Raises:
        FileNotFoundError: the body wrote nothing at the yielded path.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to '{tmp}', the temporary for '{target}'")
        normal_permissions(tmp)
        if durable:
            fsync_tree(tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        fsync_path(target.parent)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, durable: bool = False, encoding: str = "utf-8"
) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`); return the path."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def umask() -> int:
    """The process umask, read from ``/proc/self/status`` where Linux has it; elsewhere by
    setting it and restoring it at once (briefly visible to other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes a plain ``open()`` or
    ``mkdir`` would: 0666 files, 0777 folders and executables, less the umask. Links are left."""
    mask = umask()
    root = Path(path)
    for entry in [root, *root.rglob("*")] if root.is_dir() else [root]:
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        wide = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        entry.chmod(wide & ~mask)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a folder's entries to disk (a rename is durable only once its folder is
    synced). Filesystems that cannot sync a folder are tolerated."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync a file, or every file under a folder and then the folders, deepest first."""
    top = Path(root)
    if not top.is_dir():
        fsync_path(top)
        return
    directories = [top]
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        directories += [Path(dirpath) / name for name in dirnames]
    for directory in reversed(directories):
        fsync_path(directory)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
