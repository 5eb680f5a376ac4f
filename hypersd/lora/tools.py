"""`hypersd lora`: read, rescale, merge and convert LoRA files (diffusers/peft or kohya).

A LoRA is held as modules -> (A, B, alpha): ΔW = (alpha / r) · B A with r = rows of A.
Merging concatenates along the rank, ΔW = Σ w_i (α_i / r_i) B_i A_i exactly, folding each
scale into B (the result has alpha = rank, scale 1). Module names are normalised first (kohya
files name SDXL's layers two ways), and every file written carries the sd-scripts/modelspec
header (``hypersd.lora.metadata``) with its base, rank and alpha.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hypersd.errors import UserError
from hypersd.files import check_safetensors, write_file
from hypersd.generate.recipes import check_lora_scale
from hypersd.lora.formats import canonical_kohya, kohya_lookup, kohya_name, unet_layout
from hypersd.lora.metadata import SDXL, base_of, kept, lora_metadata

_DIFFUSERS = (".lora_A.weight", ".lora_B.weight")
_KOHYA = (".lora_down.weight", ".lora_up.weight")


@dataclass
class LoraFile:
    format: str                                      # "diffusers" or "kohya"
    modules: dict[str, list] = field(default_factory=dict)  # name -> [A, B, alpha]
    metadata: dict[str, str] = field(default_factory=dict)

    def scale_of(self, name: str) -> float:
        a, _, alpha = self.modules[name]
        return 1.0 if alpha is None else float(alpha) / a.shape[0]

    @property
    def base(self) -> str:
        """"sd1", "sdxl", "sd3", "flux" or "qwen-image" (``hypersd.lora.metadata.base_of``)."""
        cross = {a.shape[1] for n, (a, _, _) in self.modules.items()
                 if "attn2" in n and ("to_k" in n or "to_v" in n)}
        return base_of(self.modules, self.metadata, cross)


def read_lora(path: str | Path) -> LoraFile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist: check the path" if not path.exists()
                        else f"{path} is a folder: pass a LoRA .safetensors file")
    check_safetensors(path, "LoRA")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    kohya = any(k.endswith(_KOHYA[0]) for k in tensors)
    down, up = _KOHYA if kohya else _DIFFUSERS
    lf = LoraFile("kohya" if kohya else "diffusers", metadata=metadata)
    default_alpha = None
    if not kohya and "lora_adapter_metadata" in metadata:
        peft = json.loads(metadata["lora_adapter_metadata"])
        default_alpha = next((v for k, v in peft.items() if k.endswith("lora_alpha")), None)
    for key, value in tensors.items():
        if key.endswith(down):
            name = key[:-len(down)]
            if name + up not in tensors:
                raise UserError(f"{path}: {name} has no matching up/B matrix")
            alpha = tensors.get(name + ".alpha")
            lf.modules[name] = [value, tensors[name + up],
                                float(alpha) if alpha is not None else default_alpha]
    if not lf.modules:
        raise UserError(f"{path} holds no LoRA matrices (diffusers lora_A/lora_B or kohya lora_down/lora_up)")
    return lf


def rescale(lf: LoraFile, scale: float) -> LoraFile:
    """The same LoRA with ΔW multiplied by ``scale``."""
    check_lora_scale(scale, "--scale")
    return LoraFile(lf.format, {n: [a, b * scale, al] for n, (a, b, al) in lf.modules.items()}, lf.metadata)


def normalised(lf: LoraFile) -> LoraFile:
    """Kohya module names as we write them (``formats.canonical_kohya``): SDXL layers named the
    diffusers way or ``lora_te_`` take their original-layout and ``lora_te1_`` names."""
    if lf.format != "kohya":
        return lf
    sdxl = lf.base == SDXL
    layout = unet_layout([n[len("lora_unet_"):] for n in lf.modules if n.startswith("lora_unet_")])
    modules = {}
    for name, m in lf.modules.items():
        new = canonical_kohya(name, sdxl, layout)
        if new in modules:
            raise UserError(f"{name} and another module of this LoRA name the same layer")
        modules[new] = m
    return LoraFile(lf.format, modules, lf.metadata)


def merge(files: list[tuple[LoraFile, float]]) -> LoraFile:
    """One LoRA whose ΔW is the weighted sum of the inputs' (all in one format)."""
    formats = {lf.format for lf, _ in files}
    if len(formats) != 1:
        raise UserError("convert the LoRAs to one format before merging them")
    files = [(normalised(lf), w) for lf, w in files]
    out = LoraFile(formats.pop(), metadata=kept(files[0][0].metadata))
    out.metadata.pop("hypersd", None)  # a merge is no one stage's student
    names = dict.fromkeys(n for lf, _ in files for n in lf.modules)
    for name in names:
        parts = [(lf.modules[name], w * lf.scale_of(name)) for lf, w in files if name in lf.modules]
        a = torch.cat([m[0] for m, _ in parts], dim=0)
        b = torch.cat([m[1] * s for m, s in parts], dim=1)
        out.modules[name] = [a, b, float(a.shape[0])]
    return out


def to_format(lf: LoraFile, fmt: str, module_names: list[str] | None = None) -> LoraFile:
    """Rename modules between formats; kohya -> diffusers needs the model's module names.

    kohya names are sd-scripts' (``formats.kohya_name``): SDXL's in the original layout;
    kohya -> diffusers reads either naming of every module of the model."""
    if fmt == "kohya" and lf.format == "kohya":
        return normalised(lf)
    if fmt == lf.format:
        return lf
    if fmt == "kohya":
        sdxl = lf.base == SDXL
        unet = dict(module_names or []).get("unet") or [n.partition(".")[2] for n in lf.modules
                                                        if n.startswith("unet.")]
        layout = unet_layout(unet)
        try:
            renamed = {kohya_name(name, sdxl, layout): m for name, m in lf.modules.items()}
        except ValueError as e:
            raise UserError(f"{e}: only unet, text_encoder and text_encoder_2 modules have kohya names") from None
        return LoraFile("kohya", renamed, lf.metadata)
    if fmt == "diffusers":
        if module_names is None:
            raise UserError("converting kohya to diffusers needs the base model (--model) for module names")
        lookup = kohya_lookup(module_names)
        missing = [n for n in lf.modules if n not in lookup]
        if missing:
            raise UserError(f"{len(missing)} of the LoRA's {len(lf.modules)} modules are not in the base "
                            f"model, e.g. {missing[0]}: pass the --model the LoRA was made for")
        return LoraFile("diffusers", {lookup[n]: m for n, m in lf.modules.items()}, lf.metadata)
    raise UserError(f"unknown LoRA format {fmt!r}: use diffusers or kohya")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_lora(lf: LoraFile, path: str | Path, dtype: str | None = None) -> Path:
    """Write in the LoraFile's own format (alphas kept exactly as kohya alphas / folded into B),
    in ``dtype`` ("fp32", "fp16" or "bf16"; default: as read)."""
    tensors = {}
    for name, (a, b, alpha) in lf.modules.items():
        if lf.format == "kohya":
            tensors[f"{name}.lora_down.weight"] = a.contiguous()
            tensors[f"{name}.lora_up.weight"] = b.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(a.shape[0] if alpha is None else alpha))
        else:  # fold each module's alpha / r into B
            scale = 1.0 if alpha is None else float(alpha) / a.shape[0]
            tensors[f"{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{name}.lora_B.weight"] = (b * scale).contiguous()
    # no peft metadata: with scales folded into B, loaders infer rank from shapes, alpha = rank
    ranks = [a.shape[0] for a, _, _ in lf.modules.values()]
    alphas = ([float(r if al is None else al) for r, (_, _, al) in zip(ranks, lf.modules.values())]
              if lf.format == "kohya" else [float(r) for r in ranks])
    meta = lora_metadata(kept(lf.metadata), lf.base, ranks, alphas, Path(path).stem)
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
        tensors = {k: v if k.endswith(".alpha") else v.to(DTYPES[dtype]) for k, v in tensors.items()}
    return write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **meta}),
                      "output path")


def unet_module_names(pipe) -> list[tuple[str, list[str]]]:
    """(component, module names) of a pipeline's LoRA-able parts, for kohya -> diffusers."""
    out = [("unet", [n for n, _ in pipe.unet.named_modules() if n])]
    for comp in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, comp, None) is not None:
            out.append((comp, [n for n, _ in getattr(pipe, comp).named_modules() if n]))
    return out
