"""Filling a cache entry: images decoded by DataLoader workers, encoded by the VAE and the text
encoders in the main process, written a whole shard at a time.

Worker ``w`` of ``W`` decodes the chunks ``c`` with ``c % W == w`` (chunks of ``CHUNK``
examples never straddle a shard), and the DataLoader hands the chunks back in order, so an
entry's bytes do not depend on the number of workers. A build that stops resumes after the
last whole shard: each shard's images are encoded in the same chunks either way. Bad data
(an unreadable image, a sample without a caption) stops the build with its UserError, and the
entry, which a fixed dataset would not reuse, is removed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from hypersd.distill.cache import shards
from hypersd.distill.latents import posterior
from hypersd.distill.sources import Source
from hypersd.distill.sources.images import fit
from hypersd.errors import UserError
from hypersd.io import remove

CHUNK = 16  # examples a worker decodes, and the VAE encodes, at once


@dataclass
class Failure:
    message: str  # a worker's UserError, raised again in the main process


class Decoded(IterableDataset):
    """Chunks of (key, caption, uint8 pixels, time ids) from example ``start`` on."""

    def __init__(self, source: Source, start: int, size: int, crop: str, chunk: int):
        self.source, self.start, self.size, self.crop, self.chunk = source, start, size, crop, chunk

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        items = []
        try:
            for i, record in enumerate(self.source.records()):
                c = (i - self.start) // self.chunk
                if i < self.start or c % workers != worker:
                    continue
                items.append((record.key, record.caption, *fit(record.image(), self.size, self.crop, record.key)))
                if len(items) == self.chunk:
                    yield items
                    items = []
        except UserError as e:
            yield Failure(str(e))
            return
        if items:
            yield items


def build(folder: Path, pipe, family, source: Source, settings, parts: dict) -> None:
    """Encode every example of ``source`` into the entry ``folder`` (resuming a stopped build)."""
    done = shards.whole_shards(folder)
    start = sum(count for _, count in done)
    chunk = math.gcd(CHUNK, settings.shard_size)
    loader = DataLoader(Decoded(source, start, family.resolution, settings.crop, chunk), batch_size=None,
                        num_workers=settings.num_workers, collate_fn=_as_is)
    bar = tqdm(total=source.size, initial=start, unit="image", desc="caching latents")
    writer = ShardWriter(folder, pipe, settings.shard_size, len(done))
    try:
        for items in loader:
            if isinstance(items, Failure):
                raise UserError(items.message)
            writer.add(items)
            bar.update(len(items))
        writer.flush()
        if not done and not writer.written:
            raise UserError(f"data source {source.name} has no examples")
    except UserError:
        remove(folder)
        raise
    finally:
        bar.close()
    _finish(folder, pipe, [*done, *writer.written], parts)


def _as_is(items):
    return items


class ShardWriter:
    """Latents of each chunk as it comes; a shard's captions encoded and the shard written when full."""

    def __init__(self, folder: Path, pipe, shard_size: int, first: int):
        self.folder, self.pipe, self.shard_size, self.next = folder, pipe, shard_size, first
        self.items: list = []
        self.mean: list[torch.Tensor] = []
        self.std: list[torch.Tensor] = []
        self.written: list[tuple[str, int]] = []

    @torch.no_grad()
    def add(self, items: list) -> None:
        vae = self.pipe.vae
        pixels = torch.stack([it[2] for it in items]).to(vae.device, torch.float32).div(127.5).sub(1)
        mean, std = posterior(vae, pixels)
        self.mean.append(mean)
        self.std.append(std)
        self.items += items
        if len(self.items) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the examples held as the next shard."""
        if not self.items:
            return
        from hypersd.distill.data import encode_text
        captions = [it[1] for it in self.items]
        cond = encode_text(self.pipe, captions)
        time_ids = cond.get("added_cond_kwargs", {}).pop("time_ids", None)
        tensors = {"mean": torch.cat(self.mean).half(), "std": torch.cat(self.std).half(),
                   **{k: shards.compact(v) for k, v in shards.flatten(cond).items()}}
        if time_ids is not None:  # SDXL: each image's own sizes and crop
            tensors["time_ids"] = torch.stack([it[3] for it in self.items])
        name = shards.shard_name(self.next)
        shards.write(self.folder / name, tensors, {"captions": json.dumps(captions),
                                                   "keys": json.dumps([it[0] for it in self.items])})
        self.written.append((name, len(self.items)))
        self.next += 1
        self.items, self.mean, self.std = [], [], []


def _finish(folder: Path, pipe, written: list[tuple[str, int]], parts: dict) -> None:
    """The empty prompt's conditioning, then the index that marks the entry whole."""
    from hypersd.distill.data import encode_text
    uncond = encode_text(pipe, [""])
    uncond.get("added_cond_kwargs", {}).pop("time_ids", None)
    shards.write(folder / shards.UNCOND, {k: v.float().cpu().contiguous() for k, v in shards.flatten(uncond).items()})
    shards.write_json(folder / shards.INDEX, {"format": parts["format"], "key": parts, "count":
                      sum(n for _, n in written), "shards": [{"file": f, "count": n} for f, n in written]})
