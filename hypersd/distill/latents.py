"""Images <-> the latents a denoiser works in, for each family's VAE (one place for all of them).

AutoencoderKL (SD1.5, SDXL, SD3, FLUX): x = (z - shift_factor)·scaling_factor, which their
pipelines undo before decoding (``latents / scaling_factor + shift_factor``; SD's VAEs have no
shift). A VAE whose config carries per-channel ``latents_mean``/``latents_std`` is normalised
by channel instead, x = (z - mean)·scaling_factor / std: Qwen-Image's AutoencoderKLQwenImage
(no scaling factor; QwenImagePipeline decodes ``latents / (1 / latents_std) + latents_mean``),
as SDXL's pipeline also reads them when set.

AutoencoderKLQwenImage is a video VAE over (B, C, frames, H, W): an image is one frame, so
images go in as (B, 3, 1, H, W) and the pipeline decodes frame 0 of (B, C, 1, h, w) latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def is_video(vae) -> bool:
    """Whether ``vae`` codes frames (B, C, F, H, W): Qwen-Image's causal 3D-conv VAE."""
    from diffusers import AutoencoderKLQwenImage
    return isinstance(vae, AutoencoderKLQwenImage)


@dataclass(frozen=True)
class LatentScale:
    """x = (z - shift)·scale, numbers or per-channel (C, 1, 1) tensors."""

    shift: float | torch.Tensor
    scale: float | torch.Tensor

    @classmethod
    def of(cls, vae_config) -> "LatentScale":
        """The normalisation of a VAE by its config (see the module's docstring)."""
        factor = getattr(vae_config, "scaling_factor", None) or 1.0
        mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
        if mean is not None and std is not None:
            channel = lambda v: torch.tensor(v, dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
            return cls(channel(mean), factor / channel(std))
        return cls(getattr(vae_config, "shift_factor", None) or 0.0, factor)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the denoiser's."""
        return (z - _like(self.shift, z)) * _like(self.scale, z)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents -> the VAE's."""
        return x / _like(self.scale, x) + _like(self.shift, x)


def _like(v, x: torch.Tensor):
    return v.to(x) if isinstance(v, torch.Tensor) else v


@torch.no_grad()
def posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std) of (B, 3, H, W) images in [-1, 1], as (B, C, h, w) float32 on the CPU."""
    video = is_video(vae)
    x = pixels.to(vae.device, vae.dtype)
    dist = vae.encode(x.unsqueeze(2) if video else x).latent_dist
    mean, std = (d[:, :, 0] if video else d for d in (dist.mean, dist.std))
    return mean.float().cpu(), std.float().cpu()


def decode(vae, x: torch.Tensor) -> torch.Tensor:
    """The denoiser's (B, C, h, w) latents -> float images (B, 3, H, W), with gradient, as the
    family's pipeline decodes them."""
    z = LatentScale.of(vae.config).inverse(x).to(vae.dtype)
    if is_video(vae):
        return vae.decode(z.unsqueeze(2)).sample[:, :, 0].float()
    return vae.decode(z).sample.float()
