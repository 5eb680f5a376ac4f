"""What LoRA tools read from a file's header: sd-scripts' ``ss_*`` fields and SAI's ``modelspec.*``.

A1111 files a LoRA under SD1 or SDXL by ``ss_base_model_version`` (any other header: SD1) and
hides LoRAs of the other base; its metadata view and sd-scripts' tools show
``ss_network_dim``/``ss_network_alpha``; ``modelspec.architecture`` names base and adapter. The
values are the ones sd-scripts writes (``train_network.py``, ``library/sai_model_spec.py``).
"""

from __future__ import annotations

from collections import Counter

SD1, SDXL, SD3, FLUX, QWEN_IMAGE = "sd1", "sdxl", "sd3", "flux", "qwen-image"
_BASES = {
    SD1: {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora",
          "modelspec.implementation": "diffusers"},
    SDXL: {"ss_base_model_version": "sdxl_base_v1-0",
           "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
           "modelspec.implementation": "https://github.com/Stability-AI/generative-models"},
    SD3: {"ss_base_model_version": "sd3", "modelspec.architecture": "stable-diffusion-3-medium/lora",
          "modelspec.implementation": "diffusers"},
    FLUX: {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora",
           "modelspec.implementation": "diffusers"},
    QWEN_IMAGE: {"ss_base_model_version": "qwen_image", "modelspec.architecture": "Qwen-Image/lora",
                   "modelspec.implementation": "diffusers"},  # musubi-tuner's architecture name
}
_OURS = ("ss_", "modelspec.")


def base_of(names, metadata: dict[str, str], cross_dims=()) -> str:
    """SD1, SDXL, SD3, FLUX or Qwen-Image, from the header, else the module names (a flow
    transformer's ``transformer.``: FLUX's single-stream blocks, Qwen-Image's ``img_mlp``; a second
    text encoder, kohya's ``lora_te1_``, deep transformers), else the width cross-attention keys
    read (2048: SDXL)."""
    version = metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")
    for base, marks in ((FLUX, ("flux",)), (QWEN_IMAGE, ("qwen",)), (SD3, ("sd3", "stable-diffusion-3")),
                        (SDXL, ("sdxl", "stable-diffusion-xl"))):
        if any(mark in version for mark in marks):
            return base
    if version:
        return SD1
    if any(n.startswith("transformer.") for n in names):
        if any(".img_mlp." in n for n in names):
            return QWEN_IMAGE
        return FLUX if any(".single_transformer_blocks." in n for n in names) else SD3
    if any(n.startswith(("text_encoder_2.", "lora_te1_", "lora_te2_")) for n in names):
        return SDXL
    if any("transformer_blocks.1." in n or "transformer_blocks_1_" in n for n in names):
        return SDXL  # SD1.5 has one transformer block per attention, SDXL 2 or 10
    return SDXL if 2048 in cross_dims else SD1


def lora_metadata(metadata: dict[str, str], base: str, ranks: list[int], alphas: list[float],
                  title: str) -> dict[str, str]:
    """``metadata`` with the sd-scripts/modelspec fields set for this LoRA: its base, and the rank
    and alpha most of its modules have (``ss_network_dim``/``ss_network_alpha``)."""
    dim = Counter(ranks).most_common(1)[0][0] if ranks else 0
    alpha = Counter(alphas).most_common(1)[0][0] if alphas else dim
    out = dict(metadata)
    out.update(_BASES[base])
    out.update({"ss_network_module": "networks.lora", "ss_network_dim": str(dim),
                "ss_network_alpha": f"{alpha:g}", "ss_v2": "False",
                "modelspec.sai_model_spec": "1.0.0"})
    out.setdefault("modelspec.title", title)
    return out


def kept(metadata: dict[str, str]) -> dict[str, str]:
    """The header fields a rewritten LoRA keeps: ours (``hypersd``) and sd-scripts'/modelspec's."""
    return {k: v for k, v in metadata.items() if k == "hypersd" or k.startswith(_OURS)}
