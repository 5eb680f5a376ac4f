"""Training checkpoints that cannot lie: tensors in safetensors, everything else in JSON.

A run's checkpoint folder holds one folder per kept checkpoint, ``step-00000200``:

    checkpoint.json     step, the settings that produced it, each tensor file's size and
                        SHA-256, and the SHA-256 of this JSON's own body
    state.safetensors   every tensor of the state; its header holds the state's structure
                        (nested dicts, lists, numbers, strings) with references to the tensors
    shard-<rank>.safetensors   per-process state (sharded optimizers), the same way

A checkpoint is written to ``.tmp-step-…``, every file and the folder are fsynced, and only
then renamed into place (and the parent fsynced), so a crash or a failed write (a full disk)
leaves the previous checkpoint whole; the newest ``keep`` are kept. Reading verifies sizes
and checksums before anything is loaded: a truncated or corrupted checkpoint is named, set
aside as ``corrupt-step-…`` and the previous one is used; if none is whole the error names
them. Nothing here writes or reads a pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hypersd.errors import UserError, warn
from hypersd.io import fsync_tree, remove

FORMAT = "hypersd-checkpoint/1"
STATE = "state.safetensors"
MANIFEST = "checkpoint.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be written or trusted; the message says what to do."""


# ---- nested state <-> (JSON structure, flat tensors) ----------------------------------------

def flatten(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """``obj``'s structure as JSON, its tensors moved into ``tensors`` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: flatten(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {"$items": [[flatten(k, tensors), flatten(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"$tuple": items}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot hold {type(obj).__name__} (at {key or 'the top'})")


def unflatten(skeleton: Any, tensor: Callable[[str], torch.Tensor]) -> Any:
    """The inverse of ``flatten``: ``tensor(key)`` supplies each referenced tensor."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensor) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "$tensor" in skeleton:
        return tensor(skeleton["$tensor"])
    if "$tuple" in skeleton:
        return tuple(unflatten(v, tensor) for v in skeleton["$tuple"])
    if "$float" in skeleton:
        return float(skeleton["$float"])
    if "$items" in skeleton:
        return {unflatten(k, tensor): unflatten(v, tensor) for k, v in skeleton["$items"]}
    return {k: unflatten(v, tensor) for k, v in skeleton.items()}


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: copy the second and later ones."""
    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


# ---- files ------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_tensor_file(path: Path, state: Any) -> None:
    """``state`` (nested dicts/lists of tensors and plain values) as one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    save_file(_unshare(tensors), str(path), metadata={"skeleton": json.dumps(skeleton)})


def read_tensor_file(path: Path, prefix: str | None = None) -> Any:
    """The state ``write_tensor_file`` wrote (only the part under ``prefix``, a top-level key)."""
    with safe_open(str(path), "pt") as f:
        skeleton = json.loads(f.metadata()["skeleton"])
        if prefix is not None:
            skeleton = skeleton[prefix]
        return unflatten(skeleton, f.get_tensor)


def _body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---- a run's checkpoints ------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """One verified checkpoint: its folder, step, settings, and its state read on demand."""

    path: Path
    step: int
    settings: dict

    def state(self, prefix: str | None = None) -> Any:
        return read_tensor_file(self.path / STATE, prefix)

    def shard(self, rank: int) -> Any:
        return read_tensor_file(self.path / f"shard-{rank}.safetensors")


def _step_dirs(folder: Path) -> list[Path]:
    """The folder's checkpoints, newest first."""
    if not folder.is_dir():
        return []
    dirs = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)


def verify(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` if its manifest and every file's size and SHA-256 check out;
    else ``CheckpointError`` naming what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        body = manifest["body"]
        if manifest.get("sha256") != _body_hash(body) or body.get("format") != FORMAT:
            raise ValueError(f"{MANIFEST} does not match its checksum")
        for name, want in body["files"].items():
            file = path / name
            if not file.is_file():
                raise ValueError(f"{name} is missing")
            if file.stat().st_size != want["bytes"]:
                raise ValueError(f"{name} has {file.stat().st_size} bytes, not {want['bytes']} (truncated?)")
            if _sha256(file) != want["sha256"]:
                raise ValueError(f"{name} does not match its SHA-256 (corrupted)")
        return Checkpoint(path, int(body["step"]), body.get("settings", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:  # json errors are ValueErrors
        raise CheckpointError(f"checkpoint {path} is not whole: {e}") from None


def latest(folder: str | Path, *, set_aside: bool = True) -> Checkpoint | None:
    """The newest whole checkpoint in ``folder`` (None if it has none). Broken newer ones are
    named on stderr and, with ``set_aside``, renamed ``corrupt-step-…``; if every checkpoint
    is broken, ``CheckpointError`` names them and nothing is renamed."""
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a checkpoint in an older format, which hypersd no longer "
                              f"reads: delete it to train that stage again")
    dirs, broken = _step_dirs(folder), []
    for path in dirs:
        try:
            found = verify(path)
        except CheckpointError as e:
            broken.append((path, str(e)))
            continue
        for bad, why in broken:
            warn(f"{why}; resuming from {path.name} instead")
            if set_aside:
                os.replace(bad, bad.with_name(f"corrupt-{bad.name}"))
        return found
    if broken:
        raise CheckpointError("; ".join(why for _, why in broken) +
                              f". No whole checkpoint is left in {folder}: delete it to start over")
    return None


def save(folder: str | Path, step: int, state: Any, *, settings: dict | None = None, shard: Any = None,
         rank: int = 0, barrier: Callable[[], None] = lambda: None, keep: int = 2) -> Path:
    """Write ``state`` (by the main process, ``rank`` 0) and this process's ``shard`` (if any)
    as the checkpoint of ``step``; every process calls it, ``barrier`` syncs them. A failed
    write leaves the previous checkpoints as they were and raises ``CheckpointError``."""
    folder = Path(folder)
    final, tmp = folder / f"step-{step:08d}", folder / f".tmp-step-{step:08d}"
    try:
        if rank == 0:
            remove(tmp)
            tmp.mkdir(parents=True)
        barrier()
        if shard is not None:
            write_tensor_file(tmp / f"shard-{rank}.safetensors", shard)
        if rank == 0:
            write_tensor_file(tmp / STATE, state)
        barrier()
        if rank == 0:
            _seal(tmp, final, step, settings or {})
            _prune(folder, keep)
    except (OSError, SafetensorError) as e:
        remove(tmp)
        kept = next((p.name for p in _step_dirs(folder)), None)
        raise CheckpointError(f"could not write the checkpoint of step {step} in {folder} ({e}); "
                              + (f"{kept} is intact" if kept else "no earlier checkpoint exists")
                              + ": free disk space and run again to resume") from None
    barrier()
    return final


def _seal(tmp: Path, final: Path, step: int, settings: dict) -> None:
    """Write the manifest, fsync the folder and rename it into place."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.iterdir()) if p.suffix == ".safetensors"}
    body = {"format": FORMAT, "step": step, "settings": settings, "files": files}
    (tmp / MANIFEST).write_text(json.dumps({"body": body, "sha256": _body_hash(body)}, indent=1))
    fsync_tree(tmp)
    remove(final)  # a broken checkpoint of the same step, set aside or left by a crash
    os.replace(tmp, final)
    fsync_tree(final.parent, recursive=False)


def _prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep``; an old one is renamed before it is removed, so a crash
    mid-removal never leaves half a checkpoint under a checkpoint's name."""
    for old in _step_dirs(folder)[keep:]:
        os.replace(old, old.with_name(f".tmp-{old.name}"))
    for stale in folder.glob(".tmp-step-*"):
        remove(stale)

