"""What distillation needs to know of a base pipeline's family: SD1.5, SDXL, SD3 or FLUX.

The denoising network (a UNet or a transformer), how it is called, the forward process of its
scheduler (``process.process_of``), its resolution and latent shape, how prompts become its
conditioning, and the prefix its LoRA keys carry in diffusers files (``unet.`` or
``transformer.``, what each pipeline's ``load_lora_weights`` reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from hypersd.distill.denoiser import unet_call
from hypersd.errors import UserError
from hypersd.distill.process import Process, process_of
from hypersd.generate.flow import short_window
from hypersd.models.flux import flux_call

# FLUX's and SD3's attention and feed-forward projections [the Hyper-SD3/FLUX and
# Qwen-Image-Lightning LoRAs adapt these]; a recipe's ``lora.targets`` overrides them.
TRANSFORMER_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                            "ff_context.net.2", "proj_mlp", "proj_out"]


def sd3_call(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """SD3's transformer takes unpacked latents and the scheduler's timestep σ·T as its pipeline does."""
    return net(hidden_states=x, timestep=t.to(x.dtype), **cond).sample


@dataclass(frozen=True)
class Family:
    name: str                          # "sd15" | "sdxl" | "sd3" | "flux" (generate.loading.model_family)
    net: torch.nn.Module = field(repr=False)  # the denoising network
    call: Callable                     # its call convention (``Denoiser``'s ``call``)
    resolution: int                    # the image side it is trained at, in pixels
    latent_shape: tuple[int, int, int]
    lora_prefix: str                   # "unet" | "transformer"
    process: Process                   # its scheduler's forward process
    max_sequence_length: int = 0       # SD3/FLUX: the T5-role encoder's window when shorter than the
                                       # pipeline's default (0: the default; ``generate.flow.short_window``)

    def features(self, net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> list[torch.Tensor]:
        """Feature maps of ``net`` at integer timesteps ``t``, for adversarial heads."""
        from hypersd.distill.methods.adversarial import encoder_features, token_features
        if not self.flow:
            return encoder_features(net, x, self.process.net_time(t), cond)
        return token_features(net, x, self.process.net_time(t), cond, self.call)

    @property
    def flow(self) -> bool:
        return self.name in ("sd3", "flux")

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
    vae, scale = pipe.vae, pipe.vae_scale_factor
    channels, name = vae.config.latent_channels, model_family(pipe)
    if name in ("sd15", "sdxl"):
        res = pipe.unet.config.sample_size * scale
        return Family(name, pipe.unet, unet_call, res, (channels, res // scale, res // scale), "unet",
                      process_of(pipe.scheduler))
    if name not in ("sd3", "flux"):
        raise UserError(f"{type(pipe).__name__} models cannot be distilled here yet: use an SD1.5, SDXL, "
                        "SD3 or FLUX model")
    res = vae.config.sample_size  # transformers have no sample size: the VAE's is the model's
    seq = short_window(pipe, name) or 0  # 0: the pipeline's own default window
    tokens = (res // scale // 2) ** 2  # FLUX's and SD3's 2x2 patches: the pipelines' image_seq_len
    return Family(name, pipe.transformer, flux_call if name == "flux" else sd3_call, res,
                  (channels, res // scale, res // scale), "transformer", process_of(pipe.scheduler, tokens), seq)


@torch.no_grad()
def prompt_cond(pipe, fam: Family, prompts: list[str]) -> dict:
    """The network's keyword inputs for ``prompts`` (SD3/FLUX: token states and pooled vector)."""
    kw = {"max_sequence_length": fam.max_sequence_length} if fam.max_sequence_length else {}
    if fam.name == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu", num_images_per_prompt=1, **kw)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device="cpu",
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  **kw)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
