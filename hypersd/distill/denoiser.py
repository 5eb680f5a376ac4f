"""One wrapper hides the parameterisation: any diffusers UNet -> (x̂₀, ε̂) at (x_t, t).

Everything downstream (solvers, losses, samplers) speaks x₀ and ε. Conversions for
ᾱ = alphas_cumprod[t], x_t = √ᾱ x₀ + √(1-ᾱ) ε:
  epsilon: x̂₀ = (x_t - √(1-ᾱ) ε̂) / √ᾱ
  v:       x̂₀ = √ᾱ x_t - √(1-ᾱ) v̂,   ε̂ = √(1-ᾱ) x_t + √ᾱ v̂        [Salimans & Ho 2022]
  sample:  ε̂ = (x_t - √ᾱ x̂₀) / √(1-ᾱ)
Classifier-free guidance mixes the two predictions linearly, ε̂ = ε̂_u + ω (ε̂_c - ε̂_u) (and
so x̂₀ alike); LCM's "w" is ω - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypersd.distill.data import map_cond

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> Prediction:
    """Convert a network output of the given parameterisation into (x̂₀, ε̂)."""
    a = _bcast(alpha, x_t)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return Prediction((x_t - s1a * out) / sa, out)
    if prediction_type == "v_prediction":
        return Prediction(sa * x_t - s1a * out, s1a * x_t + sa * out)
    if prediction_type == "sample":
        return Prediction(out, (x_t - sa * out) / s1a)
    raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def native(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What a network of the given parameterisation outputs for (x₀, ε) at ᾱ: its training target."""
    a = _bcast(alpha, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")


class Denoiser:
    """Wraps a UNet2DConditionModel; ``cond`` holds its keyword inputs (SD: encoder_hidden_states;
    SDXL also added_cond_kwargs)."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")
        self.unet, self.prediction_type = unet, prediction_type
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t (float64) for integer timesteps; t = -1 means "clean" (ᾱ = 1)."""
        a = self.alphas_cumprod.to(t.device)[t.clamp(min=0)]
        return torch.where(t < 0, torch.ones_like(a), a)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε, the forward process at integer timesteps ``t``."""
        a = _bcast(self.alpha(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
                 uncond: dict | None = None, guidance: torch.Tensor | float | None = None) -> Prediction:
        """(x̂₀, ε̂) at x_t; with ``uncond`` and ``guidance``, classifier-free guided."""
        if uncond is None or guidance is None:
            out = self.unet(x_t, t, **cond).sample
            return to_x0_eps(out, x_t, self.alpha(t), self.prediction_type)
        both = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **cat_cond(uncond, cond)).sample
        u, c = both.chunk(2)
        w = _bcast(torch.as_tensor(guidance, dtype=torch.float64).expand(len(x_t)), x_t)
        return to_x0_eps(u + w * (c - u), x_t, self.alpha(t), self.prediction_type)


    @torch.no_grad()
    def solve(self, x_t: torch.Tensor, path, cond: dict, uncond: dict | None = None,
              guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """DDIM along ``path`` (``schedule.multistep_path``: (n + 1, batch) timesteps, -1 = clean):
        x_{τ_{i+1}} = Ψ(x_{τ_i}, f(x_{τ_i}, τ_i), τ_{i+1}), the teacher's multi-step jump."""
        from hypersd.distill.schedule import ddim_step
        path = torch.as_tensor(path, device=x_t.device).reshape(len(path), -1).expand(-1, len(x_t))
        x = x_t
        for t, s in zip(path[:-1], path[1:]):
            pred = self(x, t, cond, uncond, guidance)
            x = ddim_step(pred.x0, pred.eps, _bcast(self.alpha(s), x))
        return x


def cat_cond(*conds: dict) -> dict:
    """Conditioning dicts concatenated along the batch."""
    return map_cond(lambda *v: torch.cat(v), *conds)
