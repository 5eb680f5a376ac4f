"""The two forward processes a denoiser may speak, on one integer time axis.

Methods work in integer timesteps t ∈ {-1, 0, ..., T-1} (-1: the clean image), so the
schedule math of ``hypersd.distill.schedule`` (solver grids, segments, t_end, trailing
grids) serves both:

  VP (SD1.5, SDXL):  x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε, ᾱ from the model's schedule;
                     Ψ to s is DDIM's step [Song et al. 2021, eq. 12, σ = 0].
  Flow (SD3, FLUX,   σ(t) = shift((t + 1) / T), x_t = (1 - σ)·x₀ + σ·ε;
  Qwen-Image):       Ψ to s is the point (1 - σ_s)·x̂₀ + σ_s·ε̂ on the predictions' line.

The flow axis is chosen so that a trailing k-step grid (T/k·n - 1) is σ = n/k: FLUX's and
Qwen-Image's pipelines sample at σ = 1, (N-1)/N, ..., 1/N before their shift, and TSCD's
segment edges fall at σ = j/k. Each process converts a network's output of its
parameterisations into (x̂₀, ε̂) and back (the network's training target).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hypersd.distill import flow


def bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example vector shaped to broadcast over ``like``, in its dtype and device."""
    return a.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype).to(like.device)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, kind: str):
    """(x̂₀, ε̂) from a VP network's output of parameterisation ``kind`` at ᾱ = ``alpha``:
    ε: x̂₀ = (x_t - √(1-ᾱ) ε̂) / √ᾱ;  v: x̂₀ = √ᾱ x_t - √(1-ᾱ) v̂, ε̂ = √(1-ᾱ) x_t + √ᾱ v̂
    [Salimans & Ho 2022];  x₀: ε̂ = (x_t - √ᾱ x̂₀) / √(1-ᾱ)."""
    a = bcast(alpha, x_t)
    sa, sn = a.sqrt(), (1 - a).sqrt()
    if kind == "epsilon":
        return (x_t - sn * out) / sa, out
    if kind == "v_prediction":
        return sa * x_t - sn * out, sn * x_t + sa * out
    if kind == "sample":
        return out, (x_t - sa * out) / sn
    raise ValueError(f"unknown prediction type {kind!r}; use one of {PREDICTION_TYPES}")


def native(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, kind: str) -> torch.Tensor:
    """What a VP network of parameterisation ``kind`` outputs for (x₀, ε) at ᾱ: its target."""
    a = bcast(alpha, x0)
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction type {kind!r}; use one of {PREDICTION_TYPES}")


class Process:
    """What both processes share: x_t = signal(t)·x₀ + noise(t)·ε, and Ψ lands there."""

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) scales of x_t, float64, one per timestep."""
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The forward process at integer timesteps ``t`` (one per example)."""
        a, b = (bcast(c, x0) for c in self.coefficients(t))
        return a * x0 + b * eps

    def step(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Ψ: the deterministic jump to timesteps ``s`` given the predictions (x̂₀, ε̂) — DDIM's
        step for VP, the flow's Euler step for Flow; s = -1 lands on x̂₀."""
        return self.noised(x0, s, eps)

    def renoise(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t from x_s for t above s, with fresh noise ε: the forward process's transition
        x_t = (a_t / a_s)·x_s + √(b_t² - (a_t b_s / a_s)²)·ε for x = a·x₀ + b·ε [TCD's and LCM's
        re-noising between sampler steps; for VP it is √(ᾱ_t/ᾱ_s)·x_s + √(1 - ᾱ_t/ᾱ_s)·ε]."""
        (a_s, b_s), (a_t, b_t) = self.coefficients(s), self.coefficients(t)
        r = a_t / a_s
        return bcast(r, x_s) * x_s + bcast((b_t ** 2 - (r * b_s) ** 2).clamp(min=0).sqrt(), x_s) * eps


class VP(Process):
    """The variance-preserving process of ε-, v- and x₀-predicting UNets."""

    parameterisations = PREDICTION_TYPES

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t (float64); t = -1 means "clean" (ᾱ = 1)."""
        a = self.alphas_cumprod.to(t.device)[t.clamp(min=0)]
        return torch.where(t < 0, torch.ones_like(a), a)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha(t)
        return a.sqrt(), (1 - a).sqrt()

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is called with."""
        return t

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, kind: str):
        """(x̂₀, ε̂) from a network output of parameterisation ``kind``."""
        return to_x0_eps(out, x_t, self.alpha(t), kind)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
        """What a network of parameterisation ``kind`` outputs for (x₀, ε) at t."""
        return native(x0, eps, self.alpha(t), kind)


class Flow(Process):
    """The rectified-flow process of velocity-predicting transformers (SD3, FLUX, Qwen-Image)."""

    parameterisations = ("flow",)

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = flow.T):
        self.shift, self.T = float(shift), num_train_timesteps
        u = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
        self.sigmas = torch.as_tensor(flow.shift_sigmas(u, self.shift))  # σ at t = -1, 0, ..., T - 1
        self.alphas = torch.as_tensor(flow.vp_alpha(self.sigmas.numpy()))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = shift((t + 1) / T), float64: σ(-1) = 0, σ(T - 1) = 1 (a table, as VP's ᾱ)."""
        return self.sigmas.to(t.device)[t + 1]

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(t)
        return 1 - s, s

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ of the VP point with the same signal-to-noise ratio (for SNR-based weights)."""
        return self.alphas.to(t.device)[t + 1]

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """σ·T, the scheduler's timestep (FLUX's transformer is given it / T, as its pipeline does)."""
        return self.sigma(t) * self.T

    def split(self, out, x_t, t, kind):
        """x̂₀ = x_t - σ·v̂, ε̂ = x_t + (1 - σ)·v̂ for x_t = (1 - σ)x₀ + σε, v = ε - x₀."""
        if kind != "flow":
            raise ValueError(f"a flow model predicts velocity ('flow'), not {kind!r}")
        s = bcast(self.sigma(t), x_t)
        return x_t - s * out, x_t + (1 - s) * out

    def target(self, x0, eps, t, kind):
        if kind != "flow":
            raise ValueError(f"a flow model predicts velocity ('flow'), not {kind!r}")
        return flow.velocity(x0, eps)


def process_of(scheduler, image_seq_len: int | None = None):
    """The forward process of a diffusers scheduler: VP from its ᾱ, or Flow at its static shift;
    a resolution-dependent shift is the one its pipeline applies at ``image_seq_len`` tokens
    (e^μ, μ linear in the token count [FLUX.1, Qwen-Image]; 1 without a token count).

    ``shift_terminal`` (Qwen-Image's 0.02) is not part of the process: the scheduler stretches
    each N-step grid so its last σ lands there, a map that changes with N, so a sampler choice;
    students are served without it (the flow-student recipe, as Qwen-Image-Lightning's card)."""
    cfg = scheduler.config
    if "FlowMatch" not in type(scheduler).__name__:
        return VP(scheduler.alphas_cumprod.double())
    if not cfg.get("use_dynamic_shifting"):
        return Flow(cfg.get("shift", 1.0), cfg.num_train_timesteps)
    if image_seq_len is None:
        return Flow(1.0, cfg.num_train_timesteps)
    mu = flow.flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    shift = mu if cfg.get("time_shift_type", "exponential") == "linear" else math.exp(mu)
    return Flow(shift, cfg.num_train_timesteps)
