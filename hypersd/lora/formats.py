"""Conversion between diffusers/peft LoRA keys and kohya keys.

diffusers/peft: ``unet.<module path>.lora_A.weight`` / ``lora_B.weight``. kohya (sd-scripts'
``networks/lora.py``): ``<prefix>_<module path, dots as _>.lora_down.weight`` / ``lora_up.weight``
and a scalar ``.alpha`` per module (ΔW = alpha / rank · up · down). The module path is the one
sd-scripts trains on: for SD1.5 its diffusers-shaped UNet (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn1_to_q``), for SDXL the original layout (``lora_unet_input_blocks_4_1_
transformer_blocks_0_attn1_to_q``, ``middle_block_…``, ``output_blocks_…``; resnets' ``in_layers_2``,
``emb_layers_1``, ``out_layers_3``, ``skip_connection``), named by ``hypersd.models.single_file``'s
diffusers -> original key map. Text encoders: ``lora_te_`` (SD1.5), ``lora_te1_``/``lora_te2_``
(SDXL). ComfyUI, A1111, sd-scripts and diffusers map every module of SD1.5 and SDXL so named
(``tests/test_lora_formats.py`` imitates each one's key rules; A1111's SD1.5 rule assumes two
resnets a level, so UNets of other shapes, like the mini model's, are for ComfyUI and diffusers).
"""

from __future__ import annotations

import re

import torch

from hypersd.models.single_file import _UNET_TOP, unet_to_ldm

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_PREFIXES = dict(KOHYA_PREFIXES, text_encoder="lora_te1")
# SDXL's UNet, for naming modules in the original layout when no model is at hand
SDXL_LAYOUT = {"layers_per_block": 2,
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
_PARTS = {"lora_A": "lora_down", "lora_B": "lora_up"}
_BLOCK = re.compile(r"(down_blocks|up_blocks|mid_block)_(?:(\d+)_)?"
                    r"(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)")
_TOP = {k.replace(".", "_"): k for k in _UNET_TOP}


def unet_layout(names=(), config=None) -> dict:
    """What ``unet_to_ldm`` needs of a UNet (layers per block, which up blocks attend): the
    config's, else read off diffusers module paths, else SDXL's."""
    if config is not None:
        return {"layers_per_block": config["layers_per_block"],
                "up_block_types": list(config["up_block_types"])}
    found = [m for n in names if (m := re.match(r"(down|up)_blocks[._](\d+)[._](resnets|attentions)[._](\d+)", n))]
    down = [int(m[4]) + 1 for m in found if m[1] == "down"]
    attn_up = {int(m[2]) for m in found if m[1] == "up" and m[3] == "attentions"}
    if not attn_up:
        return dict(SDXL_LAYOUT, layers_per_block=max(down, default=2))
    return {"layers_per_block": max(down, default=2),
            "up_block_types": ["CrossAttnUpBlock2D" if i in attn_up else "UpBlock2D"
                               for i in range(max(attn_up) + 2)]}


def sgm_name(module: str, layout: dict) -> str:
    """A UNet module in kohya's underscore form, diffusers-named (``down_blocks_1_resnets_0_conv1``)
    -> original-layout-named (``input_blocks_4_0_in_layers_2``); other names are returned as given."""
    if module in _TOP:
        dotted = _TOP[module]
    elif m := _BLOCK.fullmatch(module):
        dotted = ".".join(p for p in m.groups()[:4] if p is not None) + "." + m[5]
    else:
        return module
    try:
        (key,) = unet_to_ldm({dotted + ".weight": None}, layout)
    except ValueError:
        return module
    return key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")


def kohya_name(path: str, sdxl: bool = False, layout: dict | None = None) -> str:
    """``unet.down_blocks.1.attentions.0.proj_in`` -> the name sd-scripts gives that module
    (``lora_unet_input_blocks_4_1_proj_in`` for SDXL)."""
    component, _, module = path.partition(".")
    prefixes = SDXL_PREFIXES if sdxl else KOHYA_PREFIXES
    if component not in prefixes or not module:
        raise ValueError(f"not a diffusers LoRA module: {path}")
    name = module.replace(".", "_")
    if sdxl and component == "unet":
        name = sgm_name(name, layout or SDXL_LAYOUT)
    return f"{prefixes[component]}_{name}"


def canonical_kohya(name: str, sdxl: bool, layout: dict | None = None) -> str:
    """A kohya module name as we write it: SDXL's UNet in the original layout and its first
    text encoder as ``lora_te1_``; SD1.5 names as given."""
    if not sdxl:
        return name
    if name.startswith("lora_te_"):
        return "lora_te1_" + name[len("lora_te_"):]
    if name.startswith("lora_unet_"):
        return "lora_unet_" + sgm_name(name[len("lora_unet_"):], layout or SDXL_LAYOUT)
    return name


def kohya_lookup(module_names: list[tuple[str, list[str]]], unet_config=None) -> dict[str, str]:
    """Every kohya name a model's module may carry -> its diffusers path (``unet.…``): UNet
    modules by diffusers and by original-layout names, the first text encoder as ``lora_te_``
    or ``lora_te1_`` (what sd-scripts, A1111 and ComfyUI write)."""
    out = {}
    for component, names in module_names:
        layout = unet_layout(names, unet_config) if component == "unet" else None
        for prefix in {KOHYA_PREFIXES[component], SDXL_PREFIXES[component]}:
            for n in names:
                kohya = f"{prefix}_{n.replace('.', '_')}"
                out[kohya] = f"{component}.{n}"
                if layout is not None:
                    out.setdefault(f"{prefix}_{sgm_name(kohya[len(prefix) + 1:], layout)}", f"{component}.{n}")
    return out


def to_kohya(state: dict[str, torch.Tensor], alpha: float | dict[str, float],
             sdxl: bool = False, unet_config=None) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA tensors -> kohya tensors, with one ``.alpha`` per module.

    ``alpha`` is the peft ``lora_alpha`` (one value, or per module path without the component
    prefix). SDXL files name UNet modules in the original layout (``unet_config``'s, else read
    off the LoRA's own module paths) and the first text encoder ``lora_te1``.
    """
    layout = unet_layout([k.partition(".")[2] for k in state if k.startswith("unet.")], unet_config)
    out = {}
    for key, tensor in state.items():
        path, _, part = key.rpartition(".")[0].rpartition(".")
        if part not in _PARTS:
            raise ValueError(f"not a diffusers LoRA key: {key}")
        base = kohya_name(path, sdxl, layout)
        out[f"{base}.{_PARTS[part]}.weight"] = tensor.contiguous()
        a = alpha if isinstance(alpha, (int, float)) else alpha[path.partition(".")[2]]
        out[f"{base}.alpha"] = torch.tensor(float(a))
    return out
