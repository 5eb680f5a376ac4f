"""Saving a student: a LoRA in diffusers format (with peft metadata) and in kohya format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hypersd.io import atomic_path
from hypersd.lora import to_kohya

METADATA_KEY = "lora_adapter_metadata"  # where diffusers looks for the peft config


def save_lora(state: dict[str, torch.Tensor], lora_config, path: str | Path, info: dict,
              kohya: bool = True, sdxl: bool = False) -> list[Path]:
    """Write ``path`` (diffusers keys ``unet.…lora_A.weight``) and ``path.kohya.safetensors``.

    ``info`` (base model, method, steps served, recommended recipe) goes into both headers
    under "hypersd", as JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v.detach().float().contiguous() for k, v in state.items()}
    peft_meta = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v)
                 for k, v in lora_config.to_dict().items()
                 if isinstance(v, (int, float, str, bool, list, set, type(None)))}
    header = {"format": "pt", METADATA_KEY: json.dumps(peft_meta, sort_keys=True),
              "hypersd": json.dumps(info, sort_keys=True)}
    written = []
    if kohya:  # first: ``path`` is written last, so its presence means the export is whole
        kpath = path.with_suffix(".kohya.safetensors")
        _save(to_kohya(tensors, lora_config.lora_alpha, sdxl=sdxl), kpath,
              {"format": "pt", "hypersd": header["hypersd"],
               "ss_network_dim": str(lora_config.r), "ss_network_alpha": str(lora_config.lora_alpha)})
        written.append(kpath)
    _save(tensors, path, header)
    return [path] + written


def _save(tensors, path: Path, metadata: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
