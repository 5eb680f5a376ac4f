"""Pure flow-matching schedule math, in float64.

Notation [rectified flow, Liu et al. 2023; SD3, Esser et al. 2024]: σ ∈ [0, 1] is the noise
level, x_σ = (1 - σ)·x₀ + σ·ε, and the network predicts the velocity v = ε - x₀ (the
direction of dx/dσ). Schedulers count time as t = σ·T with T = 1000 training timesteps, and
FLUX's and SD3's transformers take σ itself. σ = 0 is the clean image; σ = 1 pure noise.

The flow analogue of the DDIM step (Ψ) moves along the straight line the predictions define:
x_s = (1 - s)·x̂₀ + s·ε̂, which for an exact velocity is the Euler step x_σ + (s - σ)·v̂.
"""

from __future__ import annotations

import math

import numpy as np

T = 1000


def shift_sigmas(sigmas, shift: float) -> np.ndarray:
    """The static timestep shift σ' = s·σ / (1 + (s - 1)·σ) [SD3 §5.3.2, eq. 23].

    s > 1 spends more of the steps at high noise, as larger images need. s = 1 changes nothing.
    """
    if shift <= 0:
        raise ValueError(f"the shift must be positive, got {shift}")
    s = np.asarray(sigmas, dtype=np.float64)
    return shift * s / (1 + (shift - 1) * s)


def time_shift(sigmas, mu: float, power: float = 1.0) -> np.ndarray:
    """The resolution-dependent shift e^μ / (e^μ + (1/σ - 1)^p) [FLUX.1; diffusers'
    ``use_dynamic_shifting``]. With p = 1 it is the static shift with s = e^μ."""
    s = np.asarray(sigmas, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** power)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ for a given number of image tokens: linear from ``base_shift`` at ``base_seq_len`` to
    ``max_shift`` at ``max_seq_len`` (FLUX.1's scheduler config; 4096 tokens = 1024² pixels)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def _shifted(s: np.ndarray, shift: float, mu: float | None) -> np.ndarray:
    return time_shift(s, mu) if mu is not None else shift_sigmas(s, shift)


def trailing_sigmas(num_steps: int, shift: float = 1.0, mu: float | None = None) -> np.ndarray:
    """σ of an N-step Euler sampler as FLUX's and Qwen-Image's pipelines give them, then 0:
    1, (N-1)/N, ..., 1/N shifted statically by ``shift``, or by e^μ when ``mu`` is given.
    Unshifted, they are the trailing timestep grid T/N·n - 1 read as σ = (t + 1)/T."""
    if num_steps < 1:
        raise ValueError(f"a sampler takes at least one step, got {num_steps}")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps, dtype=np.float64)
    return np.append(_shifted(s, shift, mu), 0.0)


def scheduler_sigmas(num_steps: int, shift: float = 1.0, mu: float | None = None,
                     num_train_timesteps: int = T) -> np.ndarray:
    """σ of an N-step Euler sampler as FlowMatchEulerDiscreteScheduler spaces them by itself (SD3's
    pipeline), then 0: N points linear from 1 to its smallest training σ, then shifted. With a
    static shift that smallest σ is already shifted, shift(1/T), and is shifted once more."""
    if num_steps < 1:
        raise ValueError(f"a sampler takes at least one step, got {num_steps}")
    low = 1.0 / num_train_timesteps if mu is not None else float(shift_sigmas(1.0 / num_train_timesteps, shift))
    s = np.linspace(1.0, low, num_steps, dtype=np.float64)
    return np.append(_shifted(s, shift, mu), 0.0)


def noised(x0, eps, sigma):
    """x_σ = (1 - σ)·x₀ + σ·ε (``sigma`` broadcastable to x₀)."""
    return (1 - sigma) * x0 + sigma * eps


def velocity(x0, eps):
    """The flow network's target v = ε - x₀."""
    return eps - x0


def flow_step(x0, eps, sigma_s):
    """Ψ for flows: the point at σ = s on the line through the predictions (x̂₀, ε̂).

    x_s = (1 - s)·x̂₀ + s·ε̂; s = 0 lands on x̂₀ exactly. It equals the Euler step
    x_σ + (s - σ)·v̂ when (x̂₀, ε̂) come from v̂ at x_σ [the flow DDIM: both are exact on a
    straight path].
    """
    return (1 - sigma_s) * x0 + sigma_s * eps


def logit_normal(u_normal, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """Training σ from standard normal draws: σ = sigmoid(mean + std·n) [SD3 §3.1,
    "logit-normal sampling", rf/lognorm(0.00, 1.00) their best]."""
    z = mean + std * np.asarray(u_normal, dtype=np.float64)
    return 1 / (1 + np.exp(-z))


def vp_alpha(sigma) -> np.ndarray:
    """ᾱ of the variance-preserving point with σ's signal-to-noise ratio ((1 - σ) / σ)²:
    x_σ / √((1 - σ)² + σ²) is a VP sample at this ᾱ, so ε- and flow-world noise levels compare."""
    s = np.asarray(sigma, dtype=np.float64)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)
