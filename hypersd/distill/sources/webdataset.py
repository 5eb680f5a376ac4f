"""webdataset ``.tar`` shards, streamed with the standard library's ``tarfile``.

The webdataset convention: a sample is the run of adjacent files that share a key, the file's
path up to the first dot of its name (``000123.jpg`` and ``000123.txt`` are sample
``000123``); its image is the ``.jpg``/``.jpeg``/``.png``/``.webp`` file and its caption the
``.txt`` file, or a field of the ``.json`` file. Shards are a folder of ``.tar`` files (in name
order), one ``.tar``, or a brace pattern such as ``shards/{000..009}.tar`` (numeric ranges keep
their zero padding; ``{a,b}`` lists alternatives).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from hypersd.distill.sources import Record
from hypersd.distill.sources.images import open_image
from hypersd.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``a{0..2}`` -> a0, a1, a2."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def shard_paths(source: str) -> list[Path]:
    """The shards ``source`` names (a folder, a file or a brace pattern), each checked to exist."""
    path = Path(source)
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
        if not paths:
            raise UserError(f"data folder {source} has no .tar shards")
        return paths
    paths = [Path(p) for p in expand_braces(source)]
    for p in paths:
        if not p.is_file():
            raise UserError(f"shard {p} does not exist" + (f" (from {source})" if len(paths) > 1 else ""))
    return paths


class TarShards:
    size = None  # known only once every shard is read

    def __init__(self, source: str, caption_field: str = "text"):
        self.name, self.caption_field = source, caption_field
        self.paths = shard_paths(source)

    def identity(self) -> dict:
        """Each shard's name, size and modification time (a moved folder keeps its cache)."""
        stats = [(p, p.stat()) for p in self.paths]
        return {"kind": "webdataset", "caption_field": self.caption_field,
                "shards": [[p.name, s.st_size, s.st_mtime_ns] for p, s in stats]}

    def records(self) -> Iterator[Record]:
        for path in self.paths:
            for key, files in _samples(path):
                where = f"shard {path}: sample {key}"
                yield Record(f"{path.name}/{key}", self._caption(files, where), where,
                             partial(open_image, _image(files, where), where))

    def _caption(self, files: dict[str, bytes], where: str) -> str:
        try:
            if "txt" in files:
                return files["txt"].decode("utf-8").strip()
            if "json" in files:
                caption = json.loads(files["json"]).get(self.caption_field)
                if isinstance(caption, str):
                    return caption
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise UserError(f"{where}: cannot read its caption ({e})") from None
        raise UserError(f"{where}: no caption (a .txt file, or a .json with a \"{self.caption_field}\" "
                        "field; set data.caption_column to the field)")


def _image(files: dict[str, bytes], where: str) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            return files[ext]
    raise UserError(f"{where}: no image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a shard, streamed."""
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                this = f"{folder}/{stem}" if folder else stem
                if this != key and files:
                    yield key, files
                    files = {}
                key = this
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"shard {path} is not a readable tar file ({e})") from None
    if files:
        yield key, files
