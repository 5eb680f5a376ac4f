"""Tiny randomly initialised SD1.5-, SDXL-, SD3-, FLUX- and Qwen-Image-shaped pipelines, built
from configs offline.

They exercise the real loading, LoRA and sampling code paths without any download: the
tokenizer is MiniLM's (shipped by a package), the text encoders are tiny CLIP, T5 and
Qwen2.5-VL models.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hypersd.models.mini import SD15_SCHEDULE, minilm_path

TOKENS = 16
T5_TOKENS = 512  # T5's window, as FLUX's and SD3's tokenizers give it (their pipelines' defaults: 512, 256)


def _tokenizer(tokens: int = TOKENS):
    return AutoTokenizer.from_pretrained(minilm_path(), model_max_length=tokens)


def _clip_config(hidden: int, projection: int = 32) -> CLIPTextConfig:
    # [SEP] (102) ends MiniLM's token ids; CLIP pools its hidden state there.
    return CLIPTextConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENS,
                          projection_dim=projection, bos_token_id=101, eos_token_id=102, pad_token_id=0)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=8, sample_size=16)


def tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    """An SD1.5-shaped pipeline: CLIP text encoder, cross-attention UNet, 16x16 images."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=16)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(32)), tokenizer=_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: two text encoders, pooled embeddings and time ids."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=32 + 48, norm_num_groups=16)
    scheduler = DDIMScheduler(**SD15_SCHEDULE)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(32)),
        # widths differ, as in SDXL (768 and 1280): single-file loading tells the two apart by them
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(48, projection=32)),
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(unet: UNet2DConditionModel, folder, channels=(16, 32, 64), seed: int = 0) -> str:
    """A ControlNet copied from ``unet`` (``channels``: its conditioning encoder, one halving
    between each), its zero-initialised convolutions (the control image's way in, the residuals'
    ways out) made random so that the image steers; saved to ``folder``."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    for p in [*net.controlnet_cond_embedding.conv_out.parameters(), *net.controlnet_down_blocks.parameters(),
              *net.controlnet_mid_block.parameters()]:
        p.data.normal_(0, 0.05)
    net.save_pretrained(folder)
    return str(folder)


def add_to_tar(tar, name: str, data: bytes) -> None:
    """Add a file of ``data`` named ``name`` to an open tarfile (fake npm packages in tests)."""
    import io
    import tarfile
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _t5(width: int = 32):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=30522, d_model=width, d_ff=2 * width, d_kv=8, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0)).eval()  # no dropout, as loaded


def _flow_vae():
    vae = _vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=0.9)  # both used, as in FLUX's and SD3's VAEs
    return vae


def tiny_flux(seed: int = 0, guidance_embeds: bool = False):
    """A FLUX-shaped pipeline: CLIP (pooled) and T5 (tokens) encoders, a double- and single-stream
    transformer on 2x2-packed latents, the flow-matching Euler scheduler; 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(),
                        text_encoder=CLIPTextModel(_clip_config(32)), tokenizer=_tokenizer(),
                        text_encoder_2=_t5(32), tokenizer_2=_tokenizer(T5_TOKENS), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(seed: int = 0):
    """An SD3-shaped pipeline: two CLIP encoders with projections and T5, an MMDiT transformer,
    the flow-matching Euler scheduler at shift 3; 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(),
        text_encoder=CLIPTextModelWithProjection(_clip_config(32)), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(32)), tokenizer_2=_tokenizer(),
        text_encoder_3=_t5(64), tokenizer_3=_tokenizer(T5_TOKENS), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Qwen/Qwen-Image's scheduler_config.json
QWEN_IMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                        "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
                        "time_shift_type": "exponential"}


def tiny_qwen_image(seed: int = 0):
    """A Qwen-Image-shaped pipeline: a Qwen2.5-VL text encoder over MiniLM's vocabulary, the
    MMDiT on 2x2 patches, the causal 3D-conv VAE (2x downsampling here) with per-channel latent
    statistics (both used, as Qwen-Image's), Qwen-Image's scheduler; it draws 16x16 images
    unless told (``default_sample_size``: 8 latents a side)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[0.9, 1.2, 1.0, 0.8])
    text = dict(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default"},
                max_position_embeddings=2048, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=30000, video_token_id=30001,
                              vision_start_token_id=30002, vision_end_token_id=30003)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # 512 tokens: the whole chat template, as Qwen2's
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, tokenizer=tokenizer,
                             text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
                             scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER))
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_examples(pipe, n: int = 8):
    """``n`` random 16x16 images captioned "emoji 0", "emoji 1", ..., as training examples."""
    from hypersd.distill.data import LatentCaptions
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return LatentCaptions(pipe, images, [f"emoji {i}" for i in range(n)])


def tiny_run(folder, stages, **fields):
    """A run of ``stages`` into ``folder``/run: a rank-4 LoRA, a checkpoint every 2 steps."""
    from hypersd.distill.recipe import LoraSettings, RunConfig
    return RunConfig(stages=stages, output_dir=str(folder / "run"), checkpoint_every=2,
                     lora=LoraSettings(rank=4, alpha=4.0), **fields)


def full_and_resumed(build, folder, steps: int = 4, stop: int = 2, **stage):
    """One TSCD stage (``stage``: its fields) on ``build()``'s pipeline, trained in one go, and
    again stopped after ``stop`` steps (its export removed, as if interrupted) then resumed:
    the two exported LoRA paths."""
    from hypersd.distill.loop import distill
    from hypersd.distill.recipe import StageConfig

    def train(name: str, n: int):
        pipe = build()
        runs = tiny_run(folder / name, [StageConfig.make(method="tscd", steps=n, batch_size=2, lr=1e-3, **stage)])
        return distill(runs, examples=random_examples(pipe), pipe=pipe)[0]
    full = train("a", steps)
    train("b", stop).unlink()
    return full, train("b", steps)


def assert_same_weights(path_a, path_b, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Every tensor of the safetensors file ``path_a`` equals ``path_b``'s, within tolerance."""
    from safetensors import safe_open
    with safe_open(str(path_a), "pt") as a, safe_open(str(path_b), "pt") as b:
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=atol, rtol=rtol)
