"""Pure schedule and segment math, in float64.

Notation: T training timesteps (1000), ᾱ_t = alphas_cumprod[t], x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε.
Timesteps are 0-indexed as in diffusers, and t = -1 stands for the clean image (ᾱ = 1).
The DDIM solver works on a "trailing" grid of N timesteps (…, T-1); TSCD cuts the trajectory
into k segments whose edges are the trailing k-step timesteps (for k = 4: 749, 499, 249 and
the clean image), so a k-step trailing sampler jumps exactly from edge to edge.
"""

from __future__ import annotations

import numpy as np

T = 1000


def sd_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_train_timesteps: int = T) -> np.ndarray:
    """ᾱ of SD's "scaled_linear" schedule: betas linear in √β [Rombach et al. 2022]."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def solver_grid(num_points: int, num_train_timesteps: int = T) -> np.ndarray:
    """The DDIM solver's timesteps t_0 < t_1 < ... : step T/N, ending at T - 1 (trailing).

    [LCM: skipping-step grid of N points; here the points are T/N·n - 1, n = 1..N, so
    the last is T - 1 and for N = 4 the grid is 249, 499, 749, 999 as in Hyper-SD §3.1.]
    """
    if not 1 <= num_points <= num_train_timesteps or num_train_timesteps % num_points:
        raise ValueError(f"num_points must divide {num_train_timesteps}, got {num_points}")
    step = num_train_timesteps // num_points
    return np.arange(1, num_points + 1) * step - 1


def segment_start(t, k: int, num_train_timesteps: int = T):
    """Lower edge t_b of the segment holding t, with k equal segments (-1: the clean image).

    [t_b = floor(t / (T/k)) · (T/k), Hyper-SD §3.1, shifted by one to diffusers' 0-indexed
    trailing timesteps: for k = 4, t in (749, 999] has t_b = 749, and t ≤ 249 has t_b = -1.]
    A timestep on an edge belongs to the segment below it. k = 1 gives -1 for every t (CTM).
    """
    if k < 1 or num_train_timesteps % k:
        raise ValueError(f"segment count must divide {num_train_timesteps}, got {k}")
    width = num_train_timesteps // k
    return (np.asarray(t) // width) * width - 1


def check_grid(num_points: int, k: int, num_train_timesteps: int = T) -> None:
    """Every segment edge must be a solver grid point, so no solver step crosses an edge."""
    if (num_train_timesteps // k) % (num_train_timesteps // num_points):
        raise ValueError(f"a {num_points}-point solver grid does not contain the edges of {k} "
                         f"segments: choose solver_points as a multiple of {k} dividing "
                         f"{num_train_timesteps} into whole segments (e.g. 40 or 200)")


def t_end(rule: str, t_n, t_prev, k: int, u=None, num_train_timesteps: int = T):
    """Where the consistency target lands, for a sample at t_n whose solver step reaches t_prev.

    rule "zero": -1, the clean image (LCM: the student predicts x₀ directly);
    rule "edge": the segment start t_b (PCM phases);
    rule "uniform": t_b + u·(t_prev - t_b), u ~ U[0, 1), floored to an integer timestep
                    [t_end ~ U[t_b, t_{n-1}], Hyper-SD §3.1; with k = 1 this is CTM/TCD].
    """
    t_n, t_prev = np.asarray(t_n), np.asarray(t_prev)
    if rule == "zero":
        return np.full_like(t_n, -1)
    start = segment_start(t_n, k, num_train_timesteps)
    if rule == "edge":
        return start
    if rule == "uniform":
        if u is None:
            raise ValueError("rule 'uniform' needs u ~ U[0, 1)")
        span = np.maximum(t_prev - start, 0)
        return start + np.floor(np.asarray(u) * (span + 1)).astype(np.int64).clip(max=span)
    raise ValueError(f"unknown t_end rule {rule!r}: use 'zero', 'edge' or 'uniform'")


def ddim_step(x0, eps, alpha_s):
    """Ψ: the DDIM (η = 0) step to timestep s, given the predictions (x̂₀, ε̂) made at x_t.

    x_s = √ᾱ_s x̂₀ + √(1-ᾱ_s) ε̂  [Song et al. 2021, eq. 12 with σ = 0]. ``alpha_s`` is ᾱ_s,
    broadcastable to x; ᾱ = 1 lands on x̂₀ exactly.
    """
    return alpha_s ** 0.5 * x0 + (1 - alpha_s) ** 0.5 * eps


def multistep_path(t, s, n: int) -> np.ndarray:
    """The timesteps of an n-step DDIM solve from t down to s: τ_0 = t > τ_1 > ... > τ_n = s.

    τ_i = t - floor(i·(t - s) / n), so equal jumps when n divides t - s (999 → -1 in 4 steps:
    999, 749, 499, 249, -1, the 4-step trailing grid). [Progressive distillation, Salimans &
    Ho 2022; SDXL-Lightning §3: the student jumps where the teacher lands after n steps.]
    ``t`` and ``s`` may be arrays (one path per example): the result is (n + 1, *shape).
    """
    t, s = np.asarray(t, dtype=np.int64), np.asarray(s, dtype=np.int64)
    if n < 1:
        raise ValueError(f"a solve takes at least one step, got n = {n}")
    if np.any(t - s < n):
        raise ValueError(f"cannot take {n} steps between timesteps {t} and {s}: each step must move")
    i = np.arange(n + 1).reshape(-1, *([1] * t.ndim))
    return t - (i * (t - s)) // n


def lcm_boundary_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip(t), c_out(t) with c_skip(0) = 1, c_out(0) = 0 [LCM §4.2; Song et al. 2023].

    c_skip = σ_d² / ((s·t)² + σ_d²),  c_out = s·t / √((s·t)² + σ_d²), s = timestep scaling.
    """
    st = np.asarray(t, dtype=np.float64) * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / np.sqrt(st ** 2 + sigma_data ** 2)
    return c_skip, c_out


def tcd_timesteps(num_steps: int, gamma: float, num_train_timesteps: int = T,
                  original_steps: int = 50) -> list[tuple[int, int]]:
    """(t, s) pairs of TCD's sampler: predict x_s at s = floor((1 - γ)·t_prev), then re-noise.

    [TCD, Zheng et al. 2024, Alg. 4.] t runs over ``num_steps`` points of the
    ``original_steps`` grid, evenly spaced from the top.
    """
    grid = solver_grid(original_steps, num_train_timesteps)[::-1]
    idx = np.floor(np.arange(num_steps) * len(grid) / num_steps).astype(np.int64)
    ts = grid[idx]
    prev = list(ts[1:]) + [0]
    return [(int(t), int(np.floor((1 - gamma) * p))) for t, p in zip(ts, prev)]


def trailing_timesteps(num_steps: int, num_train_timesteps: int = T) -> np.ndarray:
    """A ``num_steps``-step sampler's timesteps with "trailing" spacing, from T - 1 down.

    round(T - i·T/N) - 1 for i = 0..N-1, as diffusers' schedulers space them (N need not divide
    T: 32 steps give 999, 968, 936, ...). [Lin et al. 2024, "Common diffusion noise schedules
    and sample steps are flawed", §3.3; SDXL-Lightning samples on this grid.]
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"a sampler takes 1 to {num_train_timesteps} steps, got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def progressive_path(teacher_steps: int, student_steps: int, j, num_train_timesteps: int = T) -> np.ndarray:
    """The teacher's timesteps over the student's step j: τ_0 = t_j > τ_1 > ... > τ_r = t_{j+1}.

    Both samplers are trailing; the student's N/M-fold coarser grid is a subset of the teacher's
    (r = N/M teacher steps per student step), and below the last timestep lies the clean image
    (-1). [Progressive distillation, Salimans & Ho 2022; SDXL-Lightning §3: the student jumps
    where the teacher lands after r of its steps.] ``j`` may be an array: the result is (r + 1, *shape).
    """
    if teacher_steps % student_steps:
        raise ValueError(f"the teacher's {teacher_steps} steps must be a multiple of the student's {student_steps}")
    r = teacher_steps // student_steps
    grid = np.append(trailing_timesteps(teacher_steps, num_train_timesteps), -1)
    j = np.asarray(j, dtype=np.int64)
    if np.any((j < 0) | (j >= student_steps)):
        raise ValueError(f"the student's step index must lie in [0, {student_steps}), got {j}")
    i = np.arange(r + 1).reshape(-1, *([1] * j.ndim))
    return grid[j * r + i]
