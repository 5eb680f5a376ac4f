"""Write an SD1.5- or SDXL-shaped diffusers pipeline (or its UNet alone) as one original-layout
checkpoint, and read such a UNet back.

The inverse of the key layout diffusers' ``from_single_file`` reads: UNet under
``model.diffusion_model.`` (input/middle/output blocks), VAE under ``first_stage_model.``
(encoder.down / decoder.up, 1x1-conv attention), and the text encoders: SD1.5's CLIP under
``cond_stage_model.transformer.``; SDXL's CLIP-L under ``conditioner.embedders.0.transformer.``
and its OpenCLIP-bigG under ``conditioner.embedders.1.model.`` (OpenCLIP's own names, fused
q/k/v projections, a transposed text projection). This is what A1111 and ComfyUI load as a
checkpoint, and how the tests exercise hypersd's single-file loading without a download.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM ``model.diffusion_model.`` keys."""
    per = config["layers_per_block"] + 1  # LDM layers per down block (resnets + downsampler)
    attn_up = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = (f"input_blocks.{1 + b * per + j}.0.{_resnet(rest)}" if kind == "resnets"
                   else f"input_blocks.{1 + b * per + j}.1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = (f"output_blocks.{b * per + j}.0.{_resnet(rest)}" if kind == "resnets"
                   else f"output_blocks.{b * per + j}.1.{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if b in attn_up else 1}.conv.{m[2]}"
        else:
            raise ValueError(f"no LDM name for UNet key {key}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM ``first_stage_model.`` keys."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in _VAE_ATTN:
                new = new.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if value.ndim == 2:  # linear -> 1x1 conv
                value = value[:, :, None, None]
        out[f"first_stage_model.{new}"] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text-encoder keys under ``prefix`` (LDM keeps the text_model. level)."""
    return {f"{prefix}{k if k.startswith('text_model.') else 'text_model.' + k}": v
            for k, v in state.items() if not k.endswith("position_ids")}


_OPEN_CLIP = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
              ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP's text tower under ``prefix``."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "text_projection": state.pop("text_projection.weight").T.contiguous()}
    for param in ("weight", "bias"):
        out[f"ln_final.{param}"] = state.pop(f"final_layer_norm.{param}")
    for key in [k for k in state if ".self_attn.q_proj." in k]:
        layer, param = re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(\w+)", key).groups()
        qkv = [state.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(qkv)
    for key, value in state.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
        if m is None:
            raise ValueError(f"no OpenCLIP name for text-encoder key {key}")
        rest = m[2]
        for new, old in _OPEN_CLIP:
            rest = rest.replace(new, old)
        out[f"transformer.resblocks.{m[1]}.{rest}"] = value
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """UNet + VAE + the CLIP text encoders (those the pipeline has) in the original layout."""
    out = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    encoder = getattr(pipe, "text_encoder", None)
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    if encoder_2 is not None:  # SDXL
        if encoder is not None:
            out.update(clip_to_ldm(encoder.state_dict(), "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_ldm(encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif encoder is not None and encoder.__class__.__name__.startswith("CLIPText"):
        out.update(clip_to_ldm(encoder.state_dict(), "cond_stage_model.transformer."))
    return out


def save_single_file(pipe, path: str, dtype: torch.dtype | None = None) -> None:
    """Write the pipeline as one ``.safetensors`` checkpoint in the original layout."""
    tensors = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in pipeline_to_ldm(pipe).items()}
    save_file(tensors, path)


def ldm_to_unet(state: dict[str, torch.Tensor], unet) -> dict[str, torch.Tensor]:
    """LDM ``model.diffusion_model.`` keys -> the diffusers keys of ``unet``'s architecture.

    The inverse of ``unet_to_ldm``, read off ``unet``'s own key list; a checkpoint of another
    architecture raises ValueError naming a key that has no place in it.
    """
    names = unet_to_ldm({k: k for k in unet.state_dict()}, unet.config)  # LDM key -> diffusers key
    out = {}
    for key, value in state.items():
        if key not in names:
            raise ValueError(f"{key} has no place in this UNet (another architecture?)")
        out[names[key]] = value
    return out


def save_unet_single_file(unet, path: str, dtype: torch.dtype | None = None,
                          metadata: dict[str, str] | None = None) -> None:
    """Write a UNet alone as one ``.safetensors`` in the original layout (``model.diffusion_model.``
    keys), the file A1111 and ComfyUI load as a UNet and diffusers' ``from_single_file`` reads."""
    tensors = {k: (v.to(dtype) if dtype else v).contiguous()
               for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    save_file(tensors, path, metadata=metadata)
