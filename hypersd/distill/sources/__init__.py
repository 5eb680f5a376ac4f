"""Where training examples come from: one small interface over every kind of data.

A ``Source`` lists its examples in a fixed order as ``Record``s (a unique key, a caption, and
how to read the image), says how many it has when it knows, and states its content identity
(names, sizes and times of its files, or its captions) for the latent cache's key. The kinds:

* a folder of images with ``metadata.jsonl`` (``folder.ImageFolder``; Hugging Face's
  imagefolder convention),
* a Hugging Face dataset saved with ``save_to_disk``, or ``hf:NAME`` on the hub (``hf``),
* webdataset ``.tar`` shards, a folder of them or a brace pattern (``webdataset``),
* a ``.txt`` of prompts, one a line: prompt-only data (``read_prompts``),
* ``emoji32``, the bundled dataset (``hypersd.distill.data.emoji32_examples``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from hypersd.errors import UserError

EMOJI32 = "emoji32"


@dataclass
class Record:
    key: str                             # the example's unique name in its source
    caption: str
    where: str                           # where it is, for messages: "data/metadata.jsonl line 3"
    image: Callable[[], Image.Image]     # reads and decodes the image (UserError if it cannot)


class Source(Protocol):
    name: str                            # what messages call it
    size: int | None                     # examples, if known before reading them all

    def identity(self) -> dict: ...      # what the content is, for the cache key
    def records(self) -> Iterator[Record]: ...


def kind_of(source: str) -> str:
    """"emoji32", "prompts", "webdataset", "hf" or "folder" for a ``data.source`` string."""
    path = Path(source)
    if source == EMOJI32:
        return "emoji32"
    if source.startswith("hf:"):
        return "hf"
    if "{" in source or source.endswith(".tar"):
        return "webdataset"
    if path.suffix == ".txt":
        return "prompts"
    if not path.exists():
        raise UserError(f"data source {source} does not exist: pass a folder, .tar shards, a .txt of "
                        "prompts, hf:NAME for a hub dataset, or emoji32")
    if not path.is_dir():
        raise UserError(f"data source {source} is not a folder, .tar shards or a .txt of prompts")
    if (path / "metadata.jsonl").is_file():
        return "folder"
    if any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        return "hf"
    if any(path.glob("*.tar")):
        return "webdataset"
    if not any(path.iterdir()):
        raise UserError(f"data folder {source} is empty: add images and a metadata.jsonl")
    raise UserError(f"data folder {source} has no metadata.jsonl (one {{\"file_name\": ..., \"text\": ...}} "
                    "line per image), no saved dataset and no .tar shards")


def open_source(settings) -> Source:
    """The image source ``settings`` (a ``DataSettings``) names; its listing is checked here."""
    kind = kind_of(settings.source)
    if kind == "folder":
        from hypersd.distill.sources.folder import ImageFolder
        return ImageFolder(Path(settings.source), settings.caption_column)
    if kind == "hf":
        from hypersd.distill.sources.hf import HFDataset
        return HFDataset(settings.source, settings.image_column, settings.caption_column,
                         settings.dataset_split)
    if kind == "webdataset":
        from hypersd.distill.sources.webdataset import TarShards
        return TarShards(settings.source, settings.caption_column)
    what = "is encoded when a run starts" if kind == "emoji32" else "holds prompts alone"
    raise UserError(f"data source {settings.source} {what}: there are no images to cache")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one a line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"prompt file {path} line {line}: not UTF-8 text") from None
    except IsADirectoryError:
        raise UserError(f"prompt file {path} is a folder: pass a .txt file, one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} is empty: write one prompt a line")
    return prompts
