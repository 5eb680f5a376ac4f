"""The files of a cache entry, and reading them lazily.

An entry is a folder: ``shard-00000.safetensors``, ... each holding up to ``shard_size``
examples (the latent posterior's ``mean`` and ``std`` in float16, the conditioning under
``cond/<key>`` in float16 unless a value needs float32, SDXL's per-image ``time_ids`` in
float32, the captions and keys in the file's metadata); ``uncond.safetensors``, the empty
prompt's conditioning; and ``index.json``, written last, listing the shards. Every file is
written to a temporary name and renamed into place (``hypersd.io.atomic_path``), so a shard
name on disk is a whole shard and an entry without ``index.json`` is still being built.

Reading maps each shard (safetensors files are memory-mapped) and copies only the drawn rows;
the open shards are a small LRU, so data larger than memory streams from disk.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hypersd.io import atomic_path

INDEX, UNCOND = "index.json", "uncond.safetensors"
FP16_MAX = 65504.0


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def flatten(cond: dict, prefix: str = "cond") -> dict[str, torch.Tensor]:
    """A nested conditioning dict as flat safetensors names: ``cond/added_cond_kwargs/text_embeds``."""
    out = {}
    for key, value in cond.items():
        name = f"{prefix}/{key}"
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def unflatten(tensors: dict[str, torch.Tensor], prefix: str = "cond") -> dict:
    """The nested conditioning dict back from ``flatten``'s names."""
    cond: dict = {}
    for name, value in tensors.items():
        head, *path = name.split("/")
        if head != prefix:
            continue
        node = cond
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return cond


def compact(t: torch.Tensor) -> torch.Tensor:
    """Float16 when every value fits it, else float32."""
    t = t.detach().float().cpu()
    return t.half() if t.numel() == 0 or float(t.abs().max()) < FP16_MAX else t


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, whole or not at all."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


class Shards:
    """Rows of an entry's shards, read on demand through an LRU of ``open_files`` mapped files."""

    def __init__(self, folder: Path, open_files: int = 8):
        index = json.loads((folder / INDEX).read_text())
        self.folder, self.open_files = folder, open_files
        self.files = [folder / s["file"] for s in index["shards"]]
        self.ends = torch.tensor([s["count"] for s in index["shards"]]).cumsum(0)
        self._lru: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getstate__(self):  # worker processes open their own files
        return {**self.__dict__, "_lru": OrderedDict()}

    def rows(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The float32 tensors and the captions of examples ``idx``, in that order."""
        shard = torch.searchsorted(self.ends, idx, right=True)
        local = idx - torch.cat([torch.zeros(1, dtype=self.ends.dtype), self.ends])[shard]
        parts, captions = {}, [""] * len(idx)
        for s in shard.unique().tolist():
            where = (shard == s).nonzero().flatten()
            handle, shard_captions = self._open(s)
            rows = local[where].tolist()
            for name in handle.keys():
                sl = handle.get_slice(name)
                parts.setdefault(name, []).append((where, torch.cat([sl[r:r + 1] for r in rows]).float()))
            for w, r in zip(where.tolist(), rows):
                captions[w] = shard_captions[r]
        return {name: _assemble(chunks, len(idx)) for name, chunks in parts.items()}, captions

    def _open(self, s: int):
        if self._pid != os.getpid():  # forked: another process's handles
            self._lru, self._pid = OrderedDict(), os.getpid()
        if s in self._lru:
            self._lru.move_to_end(s)
            return self._lru[s]
        handle = safe_open(str(self.files[s]), framework="pt")
        self._lru[s] = (handle, json.loads(handle.metadata()["captions"]))
        while len(self._lru) > self.open_files:
            self._lru.popitem(last=False)
        return self._lru[s]


def _assemble(chunks: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    first = chunks[0][1]
    out = torch.empty(n, *first.shape[1:], dtype=first.dtype)
    for where, values in chunks:
        out[where] = values
    return out


def whole_shards(folder: Path) -> list[tuple[str, int]]:
    """(file, examples) of the shards a stopped build left, in order, up to the first gap or
    unreadable file (the build writes it again)."""
    done = []
    while (folder / shard_name(len(done))).is_file():
        try:
            with safe_open(str(folder / shard_name(len(done))), framework="pt") as f:
                count = len(json.loads(f.metadata()["captions"]))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            break
        done.append((shard_name(len(done)), count))
    return done
