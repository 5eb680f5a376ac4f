"""Qwen-Image's transformer as a denoiser network: its tokens and the inputs its pipeline gives it.

QwenImagePipeline draws (B, 1, C, H, W) noise and packs it into 2x2 patches exactly as
FluxPipeline does (its ``_pack_latents``: the frame axis of length 1 drops out), so FLUX's
:func:`~hypersd.models.flux.pack` serves. Each step it calls the transformer with the scheduler's
timestep / 1000 (σ), ``img_shapes`` [[(1, H/2, W/2)]] per image (the grid its rotary embedding
reads), the prompt embeddings and their mask (``encoder_hidden_states_mask``: 1 for a token, 0
for padding; the pipeline passes None when nothing is padded, which attends the same).
"""

from __future__ import annotations

import torch

from hypersd.models.flux import pack, unpack


def image_shapes(batch: int, h: int, w: int) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` for ``batch`` single-frame images of (h, w) latents: one (1, h/2, w/2) each."""
    return [[(1, h // 2, w // 2)]] * batch


def dead_text_modules(net) -> list[str]:
    """The last block's text-stream modules (its text queries, attention output and MLP): the
    transformer keeps only the image tokens after its last block, so these reach no output and
    a LoRA on them would get no gradient (and stall data-parallel training waiting for one)."""
    last = f"transformer_blocks.{len(net.transformer_blocks) - 1}"
    return [f"{last}.attn.add_q_proj", f"{last}.attn.to_add_out", f"{last}.txt_mlp.net.0.proj",
            f"{last}.txt_mlp.net.2"]


def qwen_call(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """(B, C, H, W) latents in and out, ``t`` the scheduler's timestep σ·T (given as t / 1000, as
    QwenImagePipeline gives it); ``cond``: encoder_hidden_states and encoder_hidden_states_mask."""
    h, w = x.shape[-2:]
    out = net(hidden_states=pack(x), timestep=(t / 1000).to(x.dtype), img_shapes=image_shapes(len(x), h, w),
              **cond).sample
    return unpack(out, h, w)
