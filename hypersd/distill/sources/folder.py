"""A folder of images described by ``metadata.jsonl``: Hugging Face's imagefolder convention
(one JSON object a line, its ``file_name`` relative to the folder, its caption in a column,
``text`` by default).

The whole listing is checked when the source opens, before anything is encoded: every line is
a JSON object with a file name and a caption, and every file exists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from hypersd.distill.sources import Record
from hypersd.distill.sources.images import open_image
from hypersd.errors import UserError


class ImageFolder:
    def __init__(self, folder: Path, caption_column: str = "text"):
        self.folder, self.metadata = folder, folder / "metadata.jsonl"
        self.name = str(self.metadata)
        raw = self.metadata.read_bytes()
        self.digest = hashlib.sha256(raw).hexdigest()
        self.rows = [row for row in _rows(raw, self.name, caption_column) if row is not None]
        if not self.rows:
            raise UserError(f"{self.name} lists no images: write one {{\"file_name\": ..., "
                            f"\"{caption_column}\": ...}} line per image")
        for line, name, _ in self.rows:
            if not (folder / name).is_file():
                raise UserError(f"{self.name} line {line}: image {name} does not exist in {folder}")
        self.size = len(self.rows)

    def identity(self) -> dict:
        """The metadata's hash and each image's name, size and modification time."""
        files = []
        for _, name, _ in self.rows:
            stat = (self.folder / name).stat()
            files.append([name, stat.st_size, stat.st_mtime_ns])
        return {"kind": "imagefolder", "metadata": self.digest, "files": files}

    def records(self) -> Iterator[Record]:
        for line, name, caption in self.rows:
            where = f"{self.name} line {line} ({name})"
            yield Record(name, caption, where, partial(open_image, self.folder / name, where))


def _rows(raw: bytes, name: str, column: str) -> Iterator[tuple[int, str, str] | None]:
    """(line number, file name, caption) per line; None for a blank line."""
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            yield None
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{name} line {number}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise UserError(f"{name} line {number}: needs a \"file_name\" (the image's path in the folder)")
        caption = row.get(column)
        if not isinstance(caption, str):
            raise UserError(f"{name} line {number} ({row['file_name']}): no \"{column}\" caption "
                            "(set data.caption_column to the caption's field)")
        yield number, row["file_name"], caption
