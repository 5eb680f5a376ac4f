"""FLUX's token layout: latents packed into 2x2 patches, and the rotary position ids.

As FluxPipeline lays them out (its ``_pack_latents`` and ``_prepare_latent_image_ids``), so a
transformer trained or distilled here reads the same tokens in stock diffusers.
"""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2·W/2, 4C) tokens of 2x2 patches, FluxPipeline's packing."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Rotary position ids (H/2·W/2, 3) of the packed tokens: (0, row, column), as FluxPipeline."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def text_ids(n: int) -> torch.Tensor:
    """FLUX's text position ids: all zero."""
    return torch.zeros(n, 3)


def flux_call(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """A FLUX transformer as a denoiser network: (B, C, H, W) latents in and out, ``t`` the
    scheduler's timestep σ·T (the transformer is given σ, as FluxPipeline gives it t / 1000)."""
    h, w = x.shape[-2:]
    n = cond["encoder_hidden_states"].shape[1]
    out = net(hidden_states=pack(x), timestep=(t / 1000).to(x.dtype), txt_ids=text_ids(n).to(x),
              img_ids=image_ids(h, w).to(x), **cond).sample
    return unpack(out, h, w)
