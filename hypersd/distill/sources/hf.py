"""A Hugging Face dataset: a folder written by ``Dataset.save_to_disk`` (read with
``datasets.load_from_disk``), or ``hf:NAME`` on the hub (``datasets.load_dataset``).

Images come from one column (an ``Image`` feature, bytes, or paths) and captions from another;
the columns are checked, and every caption read, when the source opens.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

from hypersd.distill.sources import Record
from hypersd.distill.sources.images import open_image
from hypersd.errors import UserError


def load(source: str, split: str):
    """The dataset ``source`` names, one split of it."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data source {source} needs the datasets package: pip install 'hypersd[data]'") from None
    try:
        if source.startswith("hf:"):
            return datasets.load_dataset(source[3:], split=split)
        ds = datasets.load_from_disk(source)
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot load dataset {source}: {str(e).splitlines()[0][:200]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {source} has no split {split!r} (it has {', '.join(ds)}): "
                            "set data.dataset_split")
        ds = ds[split]
    return ds


class HFDataset:
    def __init__(self, source: str, image_column: str = "image", caption_column: str = "text",
                 split: str = "train"):
        self.name, self.split = source, split
        self.ds = load(source, split)
        for column, setting in ((image_column, "image_column"), (caption_column, "caption_column")):
            if column not in self.ds.column_names:
                raise UserError(f"dataset {source} has no column {column!r} (it has "
                                f"{', '.join(self.ds.column_names)}): set data.{setting}")
        self.image_column, self.caption_column = image_column, caption_column
        self.captions = self.ds[caption_column]
        for row, caption in enumerate(self.captions):
            if not isinstance(caption, str):
                raise UserError(f"dataset {source} row {row}: no caption in column {caption_column!r}")
        if not self.captions:
            raise UserError(f"dataset {source} ({split}) is empty")
        self.size = len(self.captions)

    def identity(self) -> dict:
        """The dataset's fingerprint and its Arrow files' names, sizes and modification times."""
        files = [Path(f["filename"]) for f in self.ds.cache_files]
        return {"kind": "hf", "source": self.name, "split": self.split, "columns": [self.image_column,
                self.caption_column], "fingerprint": getattr(self.ds, "_fingerprint", None),
                "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]}

    def records(self) -> Iterator[Record]:
        images = self.ds.select_columns([self.image_column])
        for row, caption in enumerate(self.captions):
            where = f"dataset {self.name} row {row}"
            yield Record(str(row), caption, where, partial(_cell, images, row, self.image_column, where))


def _cell(images, row: int, column: str, where: str):
    """Row ``row``'s image, decoded."""
    try:
        value = images[row][column]
    except (OSError, ValueError, SyntaxError) as e:  # an Image feature decodes on access
        raise UserError(f"{where}: cannot read the image ({str(e).splitlines()[0][:120]})") from None
    return open_image(value, where)
