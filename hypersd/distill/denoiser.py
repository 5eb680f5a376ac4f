"""One wrapper hides the parameterisation: any denoising network -> (x̂₀, ε̂) at (x_t, t).

Everything downstream (solvers, losses, samplers) speaks x₀ and ε on one integer time axis
(t = -1: the clean image). The forward process (``hypersd.distill.process``: VP for ε-, v- and
x₀-predicting UNets, Flow for velocity-predicting transformers) maps t to its noise level and
converts outputs; the network's call convention (``call``: a UNet's; FLUX's and Qwen-Image's
packed tokens) is the other thing that varies. Classifier-free guidance mixes the two predictions linearly,
ε̂ = ε̂_u + ω (ε̂_c - ε̂_u) (and so x̂₀ alike, in every parameterisation); LCM's "w" is ω - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypersd.distill import process as processes
from hypersd.distill.data import map_cond
from hypersd.distill.process import PREDICTION_TYPES, bcast

__all__ = ["Denoiser", "Prediction", "PREDICTION_TYPES", "to_x0_eps", "native", "unet_call", "cat_cond"]


@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor


def to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> Prediction:
    """Convert a VP network output of the given parameterisation at ᾱ = ``alpha`` into (x̂₀, ε̂)."""
    return Prediction(*processes.to_x0_eps(out, x_t, alpha, prediction_type))


native = processes.native


def unet_call(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """A diffusers UNet's call convention: ``net(x, t, **cond).sample``."""
    return net(x, t, **cond).sample


class Denoiser:
    """Wraps a network; ``cond`` holds its keyword inputs (SD: encoder_hidden_states; SDXL also
    added_cond_kwargs; FLUX: encoder_hidden_states and pooled_projections; Qwen-Image:
    encoder_hidden_states and encoder_hidden_states_mask).

    ``schedule`` is a ``process.Process``, or the ᾱ of a VP schedule."""

    def __init__(self, unet, schedule, prediction_type: str = "epsilon", call=unet_call):
        self.process = schedule if isinstance(schedule, processes.Process) else processes.VP(schedule)
        if prediction_type not in self.process.parameterisations:
            raise ValueError(f"unknown prediction type {prediction_type!r}; use one of "
                             f"{self.process.parameterisations}")
        self.unet, self.prediction_type, self.call = unet, prediction_type, call

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t (float64) for integer timesteps (a flow's: the VP ᾱ of equal SNR); -1: ᾱ = 1."""
        return self.process.alpha(t)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t, the forward process at integer timesteps ``t``."""
        return self.process.noised(x0, t, eps)

    def step(self, pred: Prediction, s: torch.Tensor) -> torch.Tensor:
        """Ψ(x_t, f(x_t, t), s): the deterministic jump to timesteps ``s`` (one per example)."""
        return self.process.step(pred.x0, pred.eps, s)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's own training target for (x₀, ε) at t, in its parameterisation."""
        return self.process.target(x0, eps, t, self.prediction_type)

    def from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> Prediction:
        """The prediction (x̂₀, ε̂) consistent with x_t at t for a given x̂₀."""
        a, b = (bcast(c, x_t) for c in self.process.coefficients(t))
        return Prediction(x0, (x_t - a * x0) / b)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
                 uncond: dict | None = None, guidance: torch.Tensor | float | None = None) -> Prediction:
        """(x̂₀, ε̂) at x_t; with ``uncond`` and ``guidance``, classifier-free guided."""
        tn = self.process.net_time(t)
        if uncond is None or guidance is None:
            out = self.call(self.unet, x_t, tn, cond)
        else:
            both = self.call(self.unet, torch.cat([x_t, x_t]), torch.cat([tn, tn]), cat_cond(uncond, cond))
            u, c = both.chunk(2)
            w = bcast(torch.as_tensor(guidance, dtype=torch.float64).expand(len(x_t)), x_t)
            out = u + w * (c - u)
        return Prediction(*self.process.split(out, x_t, t, self.prediction_type))

    @torch.no_grad()
    def solve(self, x_t: torch.Tensor, path, cond: dict, uncond: dict | None = None,
              guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """The deterministic sampler along ``path`` (``schedule.multistep_path``: (n + 1, batch)
        timesteps, -1 = clean): x_{τ_{i+1}} = Ψ(x_{τ_i}, f(x_{τ_i}, τ_i), τ_{i+1}), the teacher's
        multi-step jump (DDIM for VP, Euler for flows)."""
        path = torch.as_tensor(path, device=x_t.device).reshape(len(path), -1).expand(-1, len(x_t))
        x = x_t
        for t, s in zip(path[:-1], path[1:]):
            x = self.step(self(x, t, cond, uncond, guidance), s)
        return x


def cat_cond(*conds: dict) -> dict:
    """Conditioning dicts concatenated along the batch."""
    return map_cond(lambda *v: torch.cat(v), *conds)
