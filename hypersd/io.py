"""Files that are either whole or absent: write to a temporary name beside the target, then
rename over it (a rename within one folder is atomic), so a crash never leaves half a file.
The temporary copy is fsynced before the rename, so a power cut cannot expose it unwritten."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (a file or a folder).

    On success the temporary path replaces ``path`` (a folder there is removed first); on an
    exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    remove(tmp)
    try:
        yield tmp
        fsync_tree(tmp)  # a disk that cannot hold it fails here, before ``path`` is touched
    except BaseException:
        remove(tmp)
        raise
    if path.is_dir() and tmp.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_tree(path.parent, recursive=False)


def fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush ``path`` (a file, or a folder with, if ``recursive``, everything in it) to disk,
    so that a rename after it never exposes data the disk does not hold yet."""
    if recursive and path.is_dir():
        for child in path.iterdir():
            fsync_tree(child)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a whole folder, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
