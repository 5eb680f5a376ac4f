"""The user's files: inputs checked before a library reads them, outputs written all or
nothing, and the environment's refusals while writing (a full disk, a read-only folder, a
file where a folder should be) turned into one UserError that names the path and the fix."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hypersd.errors import UserError
from hypersd.io import atomic_path, fsync_tree

# Why a write failed, and what to do, for the failures that are the disk's or the path's.
_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free space or choose another {flag}",
    errno.EDQUOT: "the disk quota is used up: free space or choose another {flag}",
    errno.EACCES: "permission denied: choose another {flag}",
    errno.EPERM: "permission denied: choose another {flag}",
    errno.EROFS: "the file system is read-only: choose another {flag}",
    errno.ENOTDIR: "part of that path is a file, not a folder: choose another {flag}",
    errno.EEXIST: "a file is in the way of that folder: choose another {flag}",
    errno.EISDIR: "it is a folder, not a file: choose another {flag}",
    errno.ENAMETOOLONG: "the name is too long: choose another {flag}",
}


@contextmanager
def writing(path: str | Path, flag: str = "--out") -> Iterator[None]:
    """Turn an OSError of the disk or the path while writing ``path`` into a UserError
    (``flag`` is the option that chose the path); any other error passes through."""
    try:
        yield
    except OSError as e:
        fix = _WRITE_FIXES.get(e.errno)
        if fix is None:
            raise
        raise UserError(f"cannot write {path}: {fix.format(flag=flag)}") from e


def check_writable(path: str | Path, flag: str = "--out", folder: bool = True) -> None:
    """Refuse early, before any work, a ``path`` that cannot be written: a file where the
    folder (or a folder where the file) should be, a parent that is a file, no permission."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(f"cannot write {path}: it is {kind}: choose another {flag}")
    where = path if folder and path.exists() else path.parent  # the folder that gets new entries
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise UserError(f"cannot write {path}: {where} is a file, not a folder: choose another {flag}")
    if not os.access(where, os.W_OK):
        raise UserError(f"cannot write {path}: {where} is not writable: choose another {flag}")


def write_folder(out_dir: str | Path, writers: dict[str, Callable[[Path], None]],
                 flag: str = "--out") -> list[Path]:
    """Write each file ``name`` with ``writers[name](path)`` into a temporary folder, then
    move them in: all of them land in ``out_dir`` or none does. A new ``out_dir`` is the
    temporary folder renamed; into an existing one (its files of earlier runs stay, those of
    the same names are replaced) each file moves from a hidden temporary subfolder."""
    out_dir = Path(out_dir)
    check_writable(out_dir, flag)
    existed = out_dir.is_dir()
    made, moved, tmp = [], [], None
    try:
        with writing(out_dir, flag):
            made = _make_folders(out_dir.parent)
            inside = out_dir if existed else out_dir.parent
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=inside))
            for name, write in writers.items():
                write(tmp / name)
            fsync_tree(tmp)  # on disk before the renames expose them
            if not existed:
                os.replace(tmp, out_dir)
            else:
                for name in writers:
                    os.replace(tmp / name, out_dir / name)
                    moved.append(out_dir / name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    if tmp.exists():  # emptied by the moves
        tmp.rmdir()
    return [out_dir / name for name in writers]


def write_file(path: str | Path, write: Callable[[Path], None], flag: str = "--out") -> Path:
    """Write one file whole or not at all (``write(tmp)`` fills a temporary file beside it)."""
    path = Path(path)
    check_writable(path, flag, folder=False)
    made = []
    try:
        with writing(path, flag):
            made = _make_folders(path.parent)
            with atomic_path(path) as tmp:
                write(tmp)
    except BaseException:
        _remove_empty(made)
        raise
    return path


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, innermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            return


def check_safetensors(path: str | Path, what: str) -> None:
    """Refuse a file safetensors cannot open (cut short, or not safetensors at all) before a
    library reads it; the header check covers the whole file without reading the tensors."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {what} {path}: it is not a readable safetensors file, or it "
                        f"is cut short ({reason}): download or export it again") from e
