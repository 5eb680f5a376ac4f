"""The consistency family as methods: LCM, TCD/CTM, PCM and Hyper-SD's TSCD.

Each is a setting of one loss (``hypersd.distill.consistency``): where the target lands
(t_end) and how prediction and target are compared. The student learns with an EMA target
[Θ⁻ ← μΘ⁻ + (1-μ)Θ] updated after each of its steps; an adversarial term may be switched on
(``adversarial:``), which adds the critic's phase.

[LCM: t_end = clean, c_skip/c_out boundary, pseudo-Huber; TCD/CTM: t_end ~ U[0, t_{n-1}];
PCM: t_end at the phase edge; Hyper-SD TSCD: t_end ~ U[t_b, t_{n-1}] over k segments, MSE.]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hypersd.distill.consistency import ConsistencyConfig, ConsistencyLoss, Draw
from hypersd.distill.data import Batch
from hypersd.distill.methods.adversarial import AdversarialConfig, AdversarialTerm
from hypersd.distill.protocol import Method, StageContext, clear_grads, no_grad_pass, register


@dataclass(frozen=True)
class Rule:
    t_end: str                         # "zero" | "edge" | "uniform"
    distance: str                      # "huber" | "mse"
    boundary: bool = False             # LCM's c_skip/c_out
    recipe: str = "hyper-sd"           # the inference recipe that serves the student


@dataclass
class _Consistency:
    rule: ClassVar[Rule]
    guidance: tuple[float, float] | None = (2.0, 4.0)  # teacher CFG range ω; None: teacher without CFG
    student_guidance: bool = False     # guide the student at ω too: it keeps CFG and negative prompts
    solver_points: int = 40            # the teacher's DDIM grid; must hold every segment edge
    ema_decay: float = 0.95            # μ of the target network
    distance_weight: float = 1.0       # w of d(prediction, target) in the student's loss
    adversarial: AdversarialConfig | None = None  # the adversarial term (None: off)

    segments = 1                       # k; a field where the method has segments

    def __post_init__(self):
        if self.student_guidance and self.guidance is None:
            raise ValueError("student_guidance needs a guidance range, e.g. [2, 4]")


@dataclass
class LCMConfig(_Consistency):
    """LCM: the student predicts the clean image through c_skip/c_out [LCM §4.2]."""
    rule: ClassVar[Rule] = Rule("zero", "huber", boundary=True, recipe="lcm")
    huber_c: float = 0.001             # pseudo-Huber c


@dataclass
class TCDConfig(_Consistency):
    """TCD/CTM: t_end uniform between the clean image and t_{n-1} [TCD §4]."""
    rule: ClassVar[Rule] = Rule("uniform", "huber", recipe="tcd")
    huber_c: float = 0.001


@dataclass
class PCMConfig(_Consistency):
    """PCM: t_end at the lower edge of the phase [PCM §3]."""
    rule: ClassVar[Rule] = Rule("edge", "huber")
    segments: int = 1                  # k phases
    huber_c: float = 0.001


@dataclass
class TSCDConfig(_Consistency):
    """Hyper-SD TSCD: t_end ~ U[t_b, t_{n-1}] within k segments, MSE [Hyper-SD §3.1]."""
    rule: ClassVar[Rule] = Rule("uniform", "mse")
    segments: int = 1                  # k: 8, 4, 2, 1 in Hyper-SD's stages


class ConsistencyMethod(Method):
    """Student phase (consistency loss, plus the generator term), then the critic's if any."""

    def __init__(self, cfg: _Consistency, ctx: StageContext):
        super().__init__(cfg, ctx)
        rule = cfg.rule
        self.loss_fn = ConsistencyLoss(ConsistencyConfig(
            segments=cfg.segments, t_end=rule.t_end, solver_points=cfg.solver_points, guidance=cfg.guidance,
            student_guidance=cfg.student_guidance, distance=rule.distance,
            huber_c=getattr(cfg, "huber_c", 0.001), boundary=rule.boundary, offset_noise=ctx.offset_noise))
        self.student, self.teacher, self.target = (ctx.denoiser(r) for r in ("student", "teacher", "target"))
        self.critic = (AdversarialTerm(cfg.adversarial, ctx.nets.teacher_features, ctx.probe)
                       if cfg.adversarial else None)

    def phases(self, step: int) -> list[str]:
        return ["student", "critic"] if self.critic else ["student"]

    def params(self):
        return {"student": self.ctx.nets.trainable("student"), **({"critic": self.critic.params()} if self.critic else {})}

    def modules(self):
        return {"student": self.ctx.nets.module("student"), **({"critic": self.critic.disc} if self.critic else {})}

    def wrapped(self, phase: str, module) -> None:
        if phase == "critic":
            self.critic.wrapped(module)
        else:
            super().wrapped(phase, module)

    def optimizer_settings(self, lr: float) -> dict[str, dict]:
        critic = {"critic": {"lr": self.cfg.adversarial.lr, "betas": (0.0, 0.99)}} if self.critic else {}
        return {"student": {"lr": lr}, **critic}

    def sample(self, batch: Batch, g: torch.Generator) -> Draw:
        return self.loss_fn.draw(batch, g)

    def loss(self, phase: str, d: Draw):
        if phase == "critic":  # the heads learn from the student phase's detached candidates
            real, fake, t_end, x_t, t = d.candidates
            c_loss = self.critic.critic_loss(real, fake, t_end, x_t, t, d.cond)
            return c_loss, {"critic": c_loss.item()}
        terms = self.loss_fn.terms(self.student, self.teacher, self.target, d)
        consistency = terms.per_sample.mean()
        loss = self.cfg.distance_weight * consistency
        logs = dict(terms.logs, consistency=consistency.item())
        if self.critic:  # generator term: the student's candidate should look real
            adv = self.critic.generator_loss(terms.prediction, terms.t_end, terms.x_t, terms.t, d.cond)
            loss = loss + self.cfg.adversarial.weight * adv
            logs["adversarial"] = adv.item()
            d.candidates = (terms.target, terms.prediction.detach(), terms.t_end, terms.x_t, terms.t)
        return loss, logs

    def after_step(self, phase: str) -> None:
        if phase == "student":
            self.ctx.nets.update_target(self.cfg.ema_decay)

    def state_dict(self):  # the student and its EMA target are the loop's to save
        return {"critic": self.critic.disc.heads.state_dict()} if self.critic else {}

    def load_state_dict(self, state) -> None:
        if self.critic:
            self.critic.disc.heads.load_state_dict(state["critic"])

    def export_info(self):
        cfg, k = self.cfg, self.cfg.segments
        if cfg.student_guidance or cfg.guidance is None:  # no guidance distilled in: sample with CFG
            recipe = "tscd-cfg"
        else:
            recipe = "hyper-sd-unified" if isinstance(cfg, TSCDConfig) and k == 1 else cfg.rule.recipe
        return {"segments": k, "steps_served": "1-8" if k == 1 else f"{k}-8", "recipe": recipe}

    def passes(self, d: Draw):
        """Teacher (with CFG), target and student passes on the draws' shapes, at t = 500."""
        x, t, cond, params = d.latents, torch.full_like(d.t_n, 500), d.cond, self.params()["student"]
        guided = (d.uncond, d.omega) if self.cfg.student_guidance else ()
        teach = (d.uncond, d.omega) if self.cfg.guidance is not None else ()

        def student():
            self.student(x, t, cond, *guided).x0.float().pow(2).mean().backward()
            clear_grads(params)

        passes = {"teacher": no_grad_pass(lambda: self.teacher(x, t, cond, *teach)),
                  "target": no_grad_pass(lambda: self.target(x, t, cond, *guided)), "student_fwd_bwd": student}
        if self.critic:
            passes.update(self._critic_passes(x, t, cond))
        return passes

    def _critic_passes(self, x, t, cond):
        heads = self.critic.params()

        def generator_term():  # the student phase's extra backbone pass, into the candidate
            self.critic.generator_loss(x.clone().requires_grad_(True), t, x, t, cond).backward()

        def critic():
            self.critic.critic_loss(x, x, t, x, t, cond).backward()
            clear_grads(heads)
        return {"generator_term_fwd_bwd": generator_term, "critic_fwd_bwd": critic}


register("lcm", LCMConfig, ConsistencyMethod)
register("tcd", TCDConfig, ConsistencyMethod)
register("pcm", PCMConfig, ConsistencyMethod)
register("tscd", TSCDConfig, ConsistencyMethod)
