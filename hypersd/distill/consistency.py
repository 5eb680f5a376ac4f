"""The consistency family as one loss: LCM, PCM, TCD/CTM and Hyper-SD's TSCD are settings of it.

One example at segment count k (Hyper-SD §3.1):
  1. t_n from the solver grid, t_{n-1} the grid point below it (-1, the clean image, below
     the lowest);
  2. t_end by the rule: the clean image (LCM), the segment edge t_b (PCM), U[t_b, t_{n-1}]
     (TSCD; k = 1: CTM/TCD);
  3. the teacher's guided DDIM step: x̂_{t_{n-1}} = Ψ(x_{t_n}, f_tea(x_{t_n}, t_n, c; ω), t_{n-1});
  4. prediction = Ψ(x_{t_n}, f_stu(x_{t_n}, t_n), t_end),
     target     = Ψ(x̂_{t_{n-1}}, f_ema(x̂_{t_{n-1}}, t_{n-1}), t_end)   (no gradient);
     with ``student_guidance`` f_stu and f_ema are guided at the teacher's ω as well, so the
     student learns a guided trajectory while keeping its conditional/unconditional branches
     (a CFG-preserving student: guidance and negative prompts keep working);
  5. per-sample distance d(prediction, target): MSE or pseudo-Huber.
With ``boundary`` the student's x̂₀ gets LCM's c_skip/c_out parameterisation (LCM §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hypersd.distill.data import Batch
from hypersd.distill.denoiser import Denoiser, Prediction
from hypersd.distill.schedule import check_grid, lcm_boundary_scalings, solver_grid, t_end


@dataclass
class ConsistencyConfig:
    segments: int = 1                  # k: 8, 4, 2, 1 in Hyper-SD's stages
    t_end: str = "uniform"             # "zero" (LCM) | "edge" (PCM) | "uniform" (TSCD, CTM/TCD)
    solver_points: int = 40            # N, the teacher's DDIM grid; must hold every segment edge
    guidance: tuple[float, float] | None = (2.0, 4.0)  # ω ~ U[lo, hi] for the teacher; None: no CFG
    student_guidance: bool = False     # the student and target are guided at the same ω too, so
                                       # the student keeps CFG (negative prompts) at inference
    distance: str = "huber"            # "huber" (pseudo-Huber, LCM) or "mse"
    huber_c: float = 0.001
    boundary: bool = False             # LCM's c_skip/c_out on the student output
    offset_noise: float = 0.0          # noise perturbation: ε + o·ε_c, ε_c per channel [offset noise]


def _with_boundary(den: Denoiser, pred: Prediction, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
    c_skip, c_out = (torch.as_tensor(c, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1, 1, 1)
                     for c in lcm_boundary_scalings(t.cpu().numpy()))
    return den.from_x0(x_t, c_skip * x_t + c_out * pred.x0, t)


@dataclass
class Draw:
    """Every random draw of one batch, batch-first (so it can be split into micro-batches)."""

    latents: torch.Tensor              # x₀
    cond: dict
    uncond: dict
    t_n: torch.Tensor                  # the solver grid point the example starts from
    t_prev: torch.Tensor               # t_{n-1}, where the teacher's step lands (-1: clean)
    t_end: torch.Tensor                # where prediction and target land
    noise: torch.Tensor                # ε (with the offset perturbation, if any)
    omega: torch.Tensor                # the guidance ω of each example (1: no CFG)
    candidates: tuple | None = None    # set by a method's student phase for later phases


@dataclass
class Terms:
    """One batch's consistency terms, for losses that build on them (the adversarial term)."""

    per_sample: torch.Tensor           # d(prediction, target)
    prediction: torch.Tensor           # Ψ(x_{t_n}, f_stu, t_end), with gradient
    target: torch.Tensor               # Ψ(x̂_{t_{n-1}}, f_ema, t_end), without
    x_t: torch.Tensor
    t: torch.Tensor
    t_end: torch.Tensor
    logs: dict


class ConsistencyLoss:
    """``loss(student, teacher, target, batch, generator) -> (per-sample loss, logs)``."""

    def __init__(self, cfg: ConsistencyConfig):
        check_grid(cfg.solver_points, cfg.segments)
        if cfg.student_guidance and cfg.guidance is None:
            raise ValueError("student_guidance needs a guidance range ω to train the student at")
        self.cfg = cfg
        self.grid = torch.as_tensor(np.concatenate([[-1], solver_grid(cfg.solver_points)]))

    def sample_times(self, n: int, g: torch.Generator):
        """(t_n, t_{n-1}, t_end) for n examples; -1 means the clean image (ᾱ = 1)."""
        idx = torch.randint(1, len(self.grid), (n,), generator=g)
        t_n, t_prev = self.grid[idx], self.grid[idx - 1]
        u = torch.rand(n, generator=g, dtype=torch.float64).numpy()
        end = t_end(self.cfg.t_end, t_n.numpy(), t_prev.numpy(), self.cfg.segments, u=u)
        return t_n, t_prev, torch.as_tensor(np.asarray(end), dtype=torch.long)

    def student_prediction(self, den: Denoiser, x_t, t, cond, uncond=None, omega=None) -> Prediction:
        """The student's (or target's) prediction: guided when ``student_guidance`` is set."""
        pred = den(x_t, t, cond, uncond, omega) if self.cfg.student_guidance else den(x_t, t, cond)
        return _with_boundary(den, pred, x_t, t) if self.cfg.boundary else pred

    def __call__(self, student: Denoiser, teacher: Denoiser, target: Denoiser, batch: Batch,
                 g: torch.Generator):
        terms = self.terms(student, teacher, target, self.draw(batch, g))
        return terms.per_sample, terms.logs

    def draw(self, batch: Batch, g: torch.Generator) -> Draw:
        """Timesteps, noise and ω for every example of ``batch``, in a fixed order from ``g``."""
        cfg, x0 = self.cfg, batch.latents
        if x0 is None:
            raise ValueError("consistency distillation needs images: this data has prompts only")
        n, dev = len(x0), x0.device
        t_n, t_prev, end = (t.to(dev) for t in self.sample_times(n, g))
        noise = torch.randn(x0.shape, generator=g).to(x0)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=g).to(x0)
        if cfg.guidance is None:
            omega = torch.ones(n, dtype=torch.float64)
        else:
            lo, hi = cfg.guidance
            omega = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
        return Draw(x0, batch.cond, batch.uncond, t_n, t_prev, end, noise, omega.to(dev))

    def terms(self, student: Denoiser, teacher: Denoiser, target: Denoiser, d: Draw) -> Terms:
        """Prediction, target and their per-sample distance for the draws ``d``."""
        cfg, x0 = self.cfg, d.latents
        t_n, t_prev, end, omega = d.t_n, d.t_prev, d.t_end, d.omega
        x_tn = student.noised(x0, t_n, d.noise)
        with torch.no_grad():
            if cfg.guidance is None:
                tea = teacher(x_tn, t_n, d.cond)
            else:
                tea = teacher(x_tn, t_n, d.cond, d.uncond, omega)
            x_prev = teacher.step(tea, t_prev)
            tgt = target.step(self.student_prediction(target, x_prev, t_prev.clamp(min=0), d.cond,
                                                      d.uncond, omega), end)
            # from the clean image (t_{n-1} = -1) the only place to go is itself
            tgt = torch.where((t_prev < 0).reshape(-1, 1, 1, 1), x_prev, tgt)
        pred = student.step(self.student_prediction(student, x_tn, t_n, d.cond, d.uncond, omega), end)
        diff = (pred.float() - tgt.float()).flatten(1)
        if cfg.distance == "huber":
            per = (diff.pow(2).mean(1) + cfg.huber_c ** 2).sqrt() - cfg.huber_c
        elif cfg.distance == "mse":
            per = diff.pow(2).mean(1)
        else:
            raise ValueError(f"unknown distance {cfg.distance!r}: use 'huber' or 'mse'")
        logs = {"t_n": t_n.float().mean().item(), "t_end": end.float().mean().item(),
                "omega": omega.float().mean().item()}
        return Terms(per, pred, tgt, x_tn, t_n, end, logs)
