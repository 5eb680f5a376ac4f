"""The mini flow model: a FLUX-shaped flow-matching pipeline for 32x32 emoji.

A small ``FluxTransformer2DModel`` (double- and single-stream blocks, rotary positions) on the
mini teacher's VAE latents (8x8x4, packed by FluxPipeline into 16 tokens of 2x2 patches),
conditioned on MiniLM-L6: its token embeddings play T5's part (``encoder_hidden_states``) and
its pooled output plays CLIP's (``pooled_projections``). It is a stock ``FluxPipeline``: FLUX's
pipeline takes any encoder whose first output is the token states (T5's role) and whose
``pooler_output`` is a vector (CLIP's role), which one BertModel with its pooling layer gives
for both, while SD3's needs CLIP's projected text embeddings and penultimate hidden states, and
Qwen-Image's a Qwen2.5-VL chat template. Stock use::

    pipe = FluxPipeline.from_pretrained(MINI_FLOW_DIR, text_encoder=enc, text_encoder_2=enc,
                                        tokenizer=tok, tokenizer_2=tok)
    pipe("a red apple", negative_prompt="", true_cfg_scale=3.0, max_sequence_length=32,
         height=32, width=32, num_inference_steps=25)

The model is trained with classifier-free caption dropout, so it samples with true CFG (the
negative prompt ""), as FLUX.1 models without a guidance embedding do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from hypersd.models.mini import MAX_TOKENS, load_text_encoder

MINI_FLOW_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini-flow"
LATENT_SIZE = 8          # the mini VAE's latent side for 32-pixel images
LATENT_CHANNELS = 4

TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=6,
    attention_head_dim=64, num_attention_heads=3, joint_attention_dim=384,
    pooled_projection_dim=384, guidance_embeds=False, axes_dims_rope=(8, 28, 28),
)

# Static shift 1: at 16 tokens the image is coarse already [SD3 §5.3.2: the shift grows with
# resolution]. FLUX's own config shifts by sequence length (use_dynamic_shifting).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def build_transformer(**overrides) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})


def build_flow_scheduler(**overrides) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**{**SCHEDULER_CONFIG, **overrides})


def load_flow_text_encoder(dtype=None):
    """(tokenizer, encoder) for both of FluxPipeline's encoder slots: MiniLM with its pooler."""
    return load_text_encoder(dtype, pooled=True)


@torch.no_grad()
def encode_prompts(prompts: list[str], tokenizer, encoder, batch: int = 256):
    """(token states (N, MAX_TOKENS, 384), pooled (N, 384)) as FluxPipeline computes them with
    MiniLM in both slots and ``max_sequence_length=MAX_TOKENS``."""
    states, pooled = [], []
    for i in range(0, len(prompts), batch):
        ids = tokenizer(prompts[i:i + batch], padding="max_length", truncation=True,
                        max_length=MAX_TOKENS, return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device))
        states.append(out[0])
        pooled.append(out.pooler_output)
    return torch.cat(states), torch.cat(pooled)
