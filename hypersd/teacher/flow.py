"""The mini flow model's training (``train-teacher --phase flow``).

Rectified flow on the bundled teacher's VAE latents [Liu et al. 2023; SD3, Esser et al. 2024]:
x_σ = (1 - σ)·x₀ + σ·ε, the transformer predicts v = ε - x₀ under a plain MSE, and the
training σ are logit-normal (SD3's best, rf/lognorm(0.00, 1.00)), then shifted as the sampler
shifts. Captions are dropped at ``caption_dropout`` for classifier-free guidance, as the
UNet teacher's are. The network is ``hypersd.models.mini_flow``'s FLUX-shaped transformer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

from hypersd.distill import flow
from hypersd.io import atomic_path
from hypersd.models.mini import MINI_DIR
from hypersd.models.flux import flux_call
from hypersd.models.mini_flow import (MINI_FLOW_DIR, SCHEDULER_CONFIG, build_flow_scheduler,
                                      build_transformer, encode_prompts, load_flow_text_encoder)
from hypersd.teacher.config import TeacherConfig
from hypersd.teacher.train import _UnetTask


class FlowTask(_UnetTask):
    """Caption rows hold MiniLM's token states with its pooled vector appended as one more
    token, so caption dropout and mismatch treat both alike."""

    def __init__(self, cfg: TeacherConfig, run_dir: Path, device):
        super().__init__(cfg, run_dir, device, vae_dir=MINI_DIR / "vae")

    def encode(self, captions: list[str]) -> torch.Tensor:
        states, pooled = encode_prompts(captions, *load_flow_text_encoder())
        return torch.cat([states, pooled[:, None]], 1)

    def network(self, init):
        return build_transformer()

    def loss(self, model, g: torch.Generator):
        n = self.cfg.batch_size
        idx = torch.randint(len(self.mean), (n,), generator=g).to(self.mean.device)
        x0 = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g).to(self.mean)
        text = self._captions(idx, g)
        sigma = flow.shift_sigmas(flow.logit_normal(torch.randn(n, generator=g, dtype=torch.float64).numpy()),
                                  SCHEDULER_CONFIG["shift"])
        sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        x_t = flow.noised(x0, eps, sigma[:, None, None, None])
        v = self.velocity(model, x_t, sigma, text)
        return F.mse_loss(v.float(), flow.velocity(x0, eps)), {}

    def velocity(self, model, x_t, sigma, text):
        cond = {"encoder_hidden_states": text[:, :-1], "pooled_projections": text[:, -1]}
        return flux_call(model, x_t, sigma * 1000, cond)


def export_flow_pipeline(run_dir: str | Path, out_dir: str | Path = MINI_FLOW_DIR) -> Path:
    """The run's EMA transformer, the bundled teacher's VAE and the flow scheduler as a stock
    FluxPipeline folder in fp16 (no text encoder: MiniLM comes from its package)."""
    vae = AutoencoderKL.from_pretrained(MINI_DIR / "vae", use_safetensors=True)
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes latents / scale + shift
    transformer = FluxTransformer2DModel.from_pretrained(Path(run_dir) / "flow", use_safetensors=True)
    pipe = FluxPipeline(scheduler=build_flow_scheduler(), vae=vae, transformer=transformer,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    with atomic_path(out_dir) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)
