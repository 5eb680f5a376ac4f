"""Saving a student: a LoRA in diffusers format (with peft metadata) and in kohya format.

Both files carry the sd-scripts/modelspec header (``hypersd.lora.metadata``). The diffusers file
holds each module's alpha / rank folded into B (peft metadata lora_alpha = rank): ComfyUI and
A1111 read no peft metadata and no alpha beside ``lora_A``/``lora_B`` keys that diffusers would
also accept, so a file that is scale 1 everywhere reads the same in every tool. The kohya file
keeps rank and alpha as trained, one ``.alpha`` per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hypersd.io import atomic_path
from hypersd.lora import to_kohya
from hypersd.lora.metadata import SD1, SDXL, lora_metadata

METADATA_KEY = "lora_adapter_metadata"  # where diffusers looks for the peft config


def save_lora(state: dict[str, torch.Tensor], lora_config, path: str | Path, info: dict,
              kohya: bool = True, sdxl: bool = False, unet_config=None, prefix: str = "unet",
              base: str | None = None) -> list[Path]:
    """Write ``path`` (diffusers keys ``unet.…lora_A.weight``) and ``path.kohya.safetensors``
    (sd-scripts' names; SDXL's in ``unet_config``'s original layout). A transformer's LoRA
    (``prefix`` "transformer": SD3, FLUX, Qwen-Image) is written in diffusers' layout only;
    ``base`` names the family in the header (``hypersd.lora.metadata``; default SD1, or SDXL
    with ``sdxl``).

    ``info`` (base model, method, steps served, recommended recipe) goes into both headers
    under "hypersd", as JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    r, alpha = lora_config.r, lora_config.lora_alpha
    kohya = kohya and prefix == "unet"
    tensors = {f"{prefix}.{k}": v.detach().float().contiguous() for k, v in state.items()}
    folded = {k: v * (alpha / r) if ".lora_B." in k else v for k, v in tensors.items()}
    peft_meta = {f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v)
                 for k, v in _peft_config(lora_config, state).items()
                 if isinstance(v, (int, float, str, bool, list, set, type(None)))}
    ours = {"format": "pt", "hypersd": json.dumps(info, sort_keys=True)}
    base = base or (SDXL if sdxl else SD1)
    n = sum(k.endswith(".lora_A.weight") for k in tensors)
    written = []
    if kohya:  # first: ``path`` is written last, so its presence means the export is whole
        kpath = path.with_suffix(".kohya.safetensors")
        _save(to_kohya(tensors, alpha, sdxl=sdxl, unet_config=unet_config), kpath,
              lora_metadata(ours, base, [r] * n, [alpha] * n, kpath.stem))
        written.append(kpath)
    _save(folded, path, lora_metadata(dict(ours, **{METADATA_KEY: json.dumps(peft_meta, sort_keys=True)}),
                                      base, [r] * n, [float(r)] * n, path.stem))
    return [path] + written


def _peft_config(lora_config, state: dict) -> dict:
    """The peft config diffusers' loader rebuilds the adapter from (lora_alpha = rank: α is folded).
    With modules excluded, its targets are the file's modules by name: the loader targets what the
    file holds and would warn of suffix matches it lacks and of exclusions it never makes."""
    config = dict(lora_config.to_dict(), lora_alpha=lora_config.r)
    if config.get("exclude_modules"):
        config.update(target_modules=sorted({k.split(".lora_")[0] for k in state}), exclude_modules=None)
    return config


def _save(tensors, path: Path, metadata: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
