"""Conversion between diffusers/peft LoRA keys and kohya keys.

diffusers/peft: ``unet.<module path>.lora_A.weight`` / ``lora_B.weight``, scale alpha / rank
kept in adapter metadata. kohya: ``lora_unet_<module path with _>.lora_down.weight`` /
``lora_up.weight`` plus a scalar ``.alpha`` per module; module paths keep diffusers' names,
which is the form sd-scripts writes for SD1.5 and which ComfyUI, A1111 and diffusers all read.
"""

from __future__ import annotations

import torch

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_PARTS = {"lora_A": "lora_down", "lora_B": "lora_up"}


def to_kohya(state: dict[str, torch.Tensor], alpha: float | dict[str, float],
             sdxl: bool = False) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA tensors -> kohya tensors, with one ``.alpha`` per module.

    ``alpha`` is the peft ``lora_alpha`` (one value, or per module path without the component
    prefix). SDXL files name the first text encoder ``lora_te1``.
    """
    prefixes = dict(KOHYA_PREFIXES, text_encoder="lora_te1") if sdxl else KOHYA_PREFIXES
    out = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".")[0].rpartition(".")
        if component not in prefixes or part not in _PARTS:
            raise ValueError(f"not a diffusers LoRA key: {key}")
        base = f"{prefixes[component]}_{module.replace('.', '_')}"
        out[f"{base}.{_PARTS[part]}.weight"] = tensor.contiguous()
        a = alpha if isinstance(alpha, (int, float)) else alpha[module]
        out[f"{base}.alpha"] = torch.tensor(float(a))
    return out
