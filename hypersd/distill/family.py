"""What distillation needs to know of a base pipeline's family: SD1.5, SDXL, SD3, FLUX or Qwen-Image.

The denoising network (a UNet or a transformer), how it is called, the forward process of its
scheduler (``process.process_of``), its resolution and latent shape, how prompts become its
conditioning, the modules its LoRA adapts, and the prefix its LoRA keys carry in diffusers files
(``unet.`` or ``transformer.``, what each pipeline's ``load_lora_weights`` reads).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from hypersd.distill.denoiser import unet_call
from hypersd.distill.process import Process, process_of
from hypersd.generate.flow import short_window
from hypersd.models.flux import flux_call
from hypersd.models.qwen_image import dead_text_modules, qwen_call

# FLUX's and SD3's attention and feed-forward projections [the Hyper-SD3/FLUX LoRAs adapt
# these]; a recipe's ``lora.targets`` overrides them.
TRANSFORMER_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                            "ff_context.net.2", "proj_mlp", "proj_out"]
# Qwen-Image's blocks: the joint attention's image and text projections and each stream's MLP
# (img_mlp, txt_mlp), the modules Qwen-Image-Lightning's LoRAs adapt.
QWEN_IMAGE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                           "txt_mlp.net.2"]
FLOW_FAMILIES = ("sd3", "flux", "qwen-image")


def sd3_call(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """SD3's transformer takes unpacked latents and the scheduler's timestep σ·T as its pipeline does."""
    return net(hidden_states=x, timestep=t.to(x.dtype), **cond).sample


@dataclass(frozen=True)
class Family:
    name: str                          # "sd15" | "sdxl" | "sd3" | "flux" | "qwen-image" (generate.loading.model_family)
    net: torch.nn.Module = field(repr=False)  # the denoising network
    call: Callable                     # its call convention (``Denoiser``'s ``call``)
    resolution: int                    # the image side it is trained at, in pixels
    latent_shape: tuple[int, int, int]
    lora_prefix: str                   # "unet" | "transformer"
    process: Process                   # its scheduler's forward process
    max_sequence_length: int = 0       # SD3/FLUX: the T5-role encoder's window when shorter than the
                                       # pipeline's default (0: the default; ``generate.flow.short_window``);
                                       # Qwen-Image: the window its prompts are padded to (``prompt_cond``)
    lora_targets: tuple[str, ...] = ()  # a transformer's LoRA modules (none: the recipe's ``lora.targets``)
    lora_exclude: tuple[str, ...] = ()  # modules no LoRA adapts: ones that reach no output

    def features(self, net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> list[torch.Tensor]:
        """Feature maps of ``net`` at integer timesteps ``t``, for adversarial heads."""
        from hypersd.distill.methods.adversarial import encoder_features, token_features
        if not self.flow:
            return encoder_features(net, x, self.process.net_time(t), cond)
        return token_features(net, x, self.process.net_time(t), cond, self.call)

    @property
    def flow(self) -> bool:
        return self.name in FLOW_FAMILIES

    def student_recipe(self, recipe: str) -> str:
        """The inference recipe a student of this family is served with: a flow student samples
        with the flow's Euler step, Ψ on the trailing σ grid, whatever the UNet world's recipe."""
        return "flow-student" if self.flow else recipe

    @property
    def metadata_base(self) -> str:
        """The base its LoRA headers name (``hypersd.lora.metadata``)."""
        return {"sd15": "sd1"}.get(self.name, self.name)


def family_of(pipe) -> Family:
    """The family of a loaded diffusers pipeline (its name as ``generate`` tells it)."""
    from hypersd.generate.loading import model_family
    name = model_family(pipe)  # refuses pipelines of other models
    if name in ("sd15", "sdxl"):
        scale = pipe.vae_scale_factor
        res = pipe.unet.config.sample_size * scale
        return Family(name, pipe.unet, unet_call, res, (pipe.vae.config.latent_channels, res // scale, res // scale),
                      "unet", process_of(pipe.scheduler))
    return _flow_family(pipe, name)


def _flow_family(pipe, name: str) -> Family:
    """SD3, FLUX or Qwen-Image: a transformer on 2x2 patches of latents, its process at the model's
    own size (the pipelines' image_seq_len: the patch count)."""
    res = _resolution(pipe, name)
    side = res // pipe.vae_scale_factor
    tokens = (side // 2) ** 2
    qwen = name == "qwen-image"
    seq = _default_window(pipe) if qwen else short_window(pipe, name) or 0  # 0: the pipeline's own default
    channels = pipe.vae.config.z_dim if qwen else pipe.vae.config.latent_channels
    call = {"sd3": sd3_call, "flux": flux_call, "qwen-image": qwen_call}[name]
    targets = QWEN_IMAGE_LORA_TARGETS if qwen else TRANSFORMER_LORA_TARGETS
    exclude = dead_text_modules(pipe.transformer) if qwen else []
    return Family(name, pipe.transformer, call, res, (channels, side, side), "transformer",
                  process_of(pipe.scheduler, tokens), seq, tuple(targets), tuple(exclude))


def _resolution(pipe, name: str) -> int:
    """The image side the model is trained at: SD3's and FLUX's VAEs carry it (``sample_size``;
    transformers have none); Qwen-Image's VAE has none, so it is the side QwenImagePipeline draws
    by default (``default_sample_size · vae_scale_factor``: 1024 px)."""
    if name == "qwen-image":
        return pipe.default_sample_size * pipe.vae_scale_factor
    return pipe.vae.config.sample_size


def _default_window(pipe) -> int:
    """The text window of a default pipeline call (QwenImagePipeline's ``max_sequence_length``: 512)."""
    return inspect.signature(pipe.__call__).parameters["max_sequence_length"].default


@torch.no_grad()
def prompt_cond(pipe, fam: Family, prompts: list[str]) -> dict:
    """The network's keyword inputs for ``prompts`` (SD3/FLUX: token states and pooled vector;
    Qwen-Image: token states and their mask)."""
    if fam.name == "qwen-image":
        return _qwen_cond(pipe, prompts, fam.max_sequence_length)
    kw = {"max_sequence_length": fam.max_sequence_length} if fam.max_sequence_length else {}
    if fam.name == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu", num_images_per_prompt=1, **kw)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device="cpu",
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  **kw)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _qwen_cond(pipe, prompts: list[str], window: int) -> dict:
    """Qwen-Image's token states, cut at ``window`` tokens as its pipeline's ``encode_prompt``
    cuts them, then padded to ``window`` with zeros and mask 0, as its pipeline pads a batch's
    shorter prompts: masked tokens are no keys of the joint attention, so every prompt and the
    empty one share one shape (batches, caption dropout, CFG) and denoise as they do alone."""
    embeds, mask = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, max_sequence_length=window)
    if mask is None:  # the pipeline's way of saying no token is padding
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    pad = window - embeds.shape[1]
    return {"encoder_hidden_states": F.pad(embeds, (0, 0, 0, pad)), "encoder_hidden_states_mask": F.pad(mask, (0, pad))}
