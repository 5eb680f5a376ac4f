"""Progressive distillation, with MSE or SDXL-Lightning's adversarial objective.

A stage distils an N-step teacher sampler into an M-step student [Salimans & Ho 2022;
SDXL-Lightning, Lin et al. 2024]. One example:
  1. j ~ U{0, ..., M-1}: the student's step from t_j to t_{j+1} on its trailing grid (the
     clean image below the last);
  2. x_{t_j} = √ᾱ x₀ + √(1-ᾱ) ε, except at t = T - 1 where it is pure noise ε (the schedule
     fix: SD's ᾱ never reaches 0, but sampling starts from pure noise);
  3. real = the teacher's DDIM solve over its N/M steps between t_j and t_{j+1} (guided at ω
     with ``guidance``, as the base model is), no gradient;
  4. fake = Ψ(x_{t_j}, f_stu(x_{t_j}, t_j), t_{j+1}), the student's single step;
  5. loss = w_mse · |fake - real|² + λ · softplus(-D(fake | x_t)), D Lightning's discriminator.
The adversarial phases [SDXL-Lightning: the discriminator is a trainable copy of the
teacher's encoder and mid block with a 4x4 stride-2 conv + GroupNorm + SiLU head per level,
non-saturating, fresh every stage]: for the first ``conditional_steps`` steps a discriminator
that sees (x_t, candidate), then a fresh one that sees the candidate alone (the unconditional
fine-tune, the paper's remedy for "Janus" artifacts). A finished stage is the next one's
teacher (``teacher: previous``); any finished stage can be named instead (a skip-level
teacher), or a LoRA file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypersd import checkpoint
from hypersd.distill.data import Batch
from hypersd.distill.denoiser import PREDICTION_TYPES
from hypersd.distill.methods.adversarial import AdversarialConfig, AdversarialTerm
from hypersd.distill.protocol import Method, StageContext, clear_grads, no_grad_pass, register
from hypersd.distill.schedule import T, progressive_path, trailing_timesteps


@dataclass
class LightningAdversarialConfig:
    """The adversarial objective of a progressive stage (absent: MSE only)."""

    weight: float = 1.0                # λ of the generator's term
    lr: float = 1e-4                   # the discriminator's learning rate, Adam β = (0, 0.99)
    hidden: int = 64                   # channels of each head
    conditional_steps: int = -1        # steps with the conditional discriminator; -1: all of them
    unconditional: bool = True         # after them, a fresh candidate-only one (False: keep the
                                       # conditional one)

    def __post_init__(self):
        if self.conditional_steps < -1:
            raise ValueError(f"conditional_steps must be -1 (all), 0 or more, not {self.conditional_steps}")
        if self.conditional_steps == 0 and not self.unconditional:
            raise ValueError("conditional_steps 0 needs the unconditional discriminator (unconditional: true)")


@dataclass
class ProgressiveConfig:
    """A stage distilling the teacher's N-step sampler into the student's M steps."""

    student_steps: int = 8             # M
    teacher_steps: int = 32            # N, a multiple of M: each student step spans N/M of the teacher's
    teacher: str = "previous"          # "previous" stage's student, "base", a finished stage's name, a LoRA file
    guidance: tuple[float, float] | None = None  # the teacher's CFG ω ~ U[lo, hi] (the base's; None: unguided)
    mse_weight: float = 1.0            # w_mse
    adversarial: LightningAdversarialConfig | None = None
    pure_noise: bool = True            # train at t = T - 1 from pure noise (the schedule fix)
    prediction: str = ""               # the student's parameterisation ("" = the base model's; "sample" = x₀)

    def __post_init__(self):
        if self.student_steps < 1 or self.teacher_steps % self.student_steps:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of "
                             f"student_steps ({self.student_steps})")
        if self.prediction and self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTION_TYPES)}, not {self.prediction!r}")
        if self.adversarial is None and self.mse_weight <= 0:
            raise ValueError("a stage without an adversarial objective needs mse_weight > 0")


@dataclass
class ProgressiveDraw:
    latents: torch.Tensor              # x₀
    cond: dict
    uncond: dict
    j: torch.Tensor                    # the student's step index
    noise: torch.Tensor                # ε
    omega: torch.Tensor                # the teacher's guidance ω (1: none)
    candidates: tuple | None = None    # (real, fake, s, x_t, t), set by the student phase


class ProgressiveMethod(Method):
    """Student phase, then the phase of the stage's current discriminator (if adversarial)."""

    def __init__(self, cfg: ProgressiveConfig, ctx: StageContext):
        super().__init__(cfg, ctx)
        self.grid = torch.as_tensor(list(trailing_timesteps(cfg.student_steps)) + [-1])
        self.teacher_role = self._teacher_role(ctx, cfg.teacher)
        prediction = cfg.prediction or ctx.prediction_type
        self.student = ctx.denoiser("student", prediction)
        self.teacher = ctx.denoiser(self.teacher_role)
        self.critics = self._critics(cfg.adversarial, ctx) if cfg.adversarial else {}
        self._critic = self.critic_at(0)  # the phase's discriminator, set by ``phases(step)``

    def _teacher_role(self, ctx: StageContext, teacher: str) -> str:
        """The role holding the teacher's weights: "teacher" (the base) or one loaded for the stage."""
        if teacher == "previous":
            teacher = next(reversed(ctx.finished), "base")
        if teacher == "base":
            return "teacher"
        if teacher in ctx.finished:
            state = checkpoint.latest(ctx.finished[teacher]).state("student")
        elif teacher.endswith(".safetensors"):
            try:
                state = ctx.nets.file_state(teacher)
            except (FileNotFoundError, KeyError) as e:
                raise ValueError(f"teacher {teacher}: {e}") from e
        else:
            done = ", ".join(ctx.finished) or "none"
            raise ValueError(f"teacher {teacher!r} is no finished stage of this run ({done}), "
                             f"'base', 'previous' or a LoRA file")
        ctx.nets.add_role("progressive_teacher")
        ctx.nets.load_state("progressive_teacher", state)
        return "progressive_teacher"

    def _critics(self, adv: LightningAdversarialConfig, ctx: StageContext) -> dict[str, AdversarialTerm]:
        """Fresh discriminators, each with a trainable copy of the teacher's encoder and mid
        block: conditional, then unconditional."""
        kinds = {"critic": True} if adv.conditional_steps != 0 else {}
        if adv.unconditional and adv.conditional_steps != -1:
            kinds["critic_uncond"] = False
        def critic(phase: str, conditional: bool) -> AdversarialTerm:
            cfg = AdversarialConfig(adv.weight, "nonsaturating", conditional, adv.lr, adv.hidden)
            backbone = encoder_only(ctx.nets.merged_unet(self.teacher_role))
            return AdversarialTerm(cfg, None, ctx.probe, backbone, phase)
        return {phase: critic(phase, conditional) for phase, conditional in kinds.items()}

    def critic_at(self, step: int) -> AdversarialTerm | None:
        adv = self.cfg.adversarial
        if not self.critics:
            return None
        late = adv.conditional_steps != -1 and step >= adv.conditional_steps and "critic_uncond" in self.critics
        return self.critics["critic_uncond" if late else "critic"]

    def phases(self, step: int) -> list[str]:
        self._critic = self.critic_at(step)
        return ["student"] + ([self._critic.phase] if self._critic else [])

    def params(self):
        return {"student": self.ctx.nets.trainable("student"), **{p: c.params() for p, c in self.critics.items()}}

    def modules(self):
        return {"student": self.ctx.nets.module("student"), **{p: c.disc for p, c in self.critics.items()}}

    def wrapped(self, phase: str, module) -> None:
        if phase in self.critics:
            self.critics[phase].wrapped(module)
        else:
            super().wrapped(phase, module)

    def optimizer_settings(self, lr: float):
        adam = {"betas": (0.0, 0.99)}  # [SDXL-Lightning: Adam β = (0, 0.99)]
        return {"student": {"lr": lr, **adam}, **{p: {"lr": self.cfg.adversarial.lr, **adam} for p in self.critics}}

    def sample(self, batch: Batch, g: torch.Generator) -> ProgressiveDraw:
        if batch.latents is None:
            raise ValueError("progressive distillation needs images: this data has prompts only")
        n, x0 = len(batch.latents), batch.latents
        j = torch.randint(0, self.cfg.student_steps, (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        if self.cfg.guidance is None:
            omega = torch.ones(n, dtype=torch.float64)
        else:
            lo, hi = self.cfg.guidance
            omega = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
        return ProgressiveDraw(x0, batch.cond, batch.uncond, j.to(x0.device), noise, omega.to(x0.device))

    def start(self, d: ProgressiveDraw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, s) of each example's student step: noised data, pure noise at T - 1 (fix)."""
        t, s = self.grid[d.j].to(d.j.device), self.grid[d.j + 1].to(d.j.device)
        x_t = self.student.noised(d.latents, t, d.noise)
        if self.cfg.pure_noise:
            x_t = torch.where((t == T - 1).reshape(-1, 1, 1, 1), d.noise, x_t)
        return x_t, t, s

    @torch.no_grad()
    def teacher_target(self, x_t: torch.Tensor, d: ProgressiveDraw) -> torch.Tensor:
        """Where the teacher's sampler lands after its N/M steps from x_t (guided if ω ≠ 1)."""
        path = torch.as_tensor(progressive_path(self.cfg.teacher_steps, self.cfg.student_steps, d.j.cpu().numpy()))
        guided = (d.uncond, d.omega) if bool((d.omega != 1).any()) else ()
        return self.teacher.solve(x_t, path.to(x_t.device), d.cond, *guided)

    def student_step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.student.step(self.student(x_t, t, cond), s)

    def loss(self, phase: str, d: ProgressiveDraw):
        if phase != "student":  # the discriminator learns from the student phase's candidates
            real, fake, s, x_t, t = d.candidates
            c_loss = self.critics[phase].critic_loss(real, fake, s, x_t, t, d.cond)
            return c_loss, {phase: c_loss.item()}
        x_t, t, s = self.start(d)
        real = self.teacher_target(x_t, d)
        fake = self.student_step(x_t, t, s, d.cond)
        mse = (fake.float() - real.float()).pow(2).flatten(1).mean(1).mean()
        loss, logs = self.cfg.mse_weight * mse, {"mse": mse.item(), "t": t.float().mean().item()}
        if self._critic is not None:
            adv = self._critic.generator_loss(fake, s, x_t, t, d.cond)
            loss = loss + self.cfg.adversarial.weight * adv
            logs["adversarial"] = adv.item()
            d.candidates = (real, fake.detach(), s, x_t, t)
        return loss, logs

    def state_dict(self):
        return {phase: c.disc.state_dict() for phase, c in self.critics.items()}

    def load_state_dict(self, state) -> None:
        for phase, c in self.critics.items():
            c.disc.load_state_dict(state[phase])

    def close(self) -> None:
        if self.teacher_role != "teacher":
            self.ctx.nets.drop_role(self.teacher_role)

    def export_info(self):
        prediction = self.cfg.prediction or self.ctx.prediction_type
        recipe = "lightning-1step" if prediction == "sample" and self.cfg.student_steps == 1 else "lightning"
        return {"recipe": recipe, "steps_served": str(self.cfg.student_steps), "prediction_type": prediction,
                "teacher_steps": self.cfg.teacher_steps}

    def passes(self, d: ProgressiveDraw):
        """Step 0's passes: the teacher's solve, the student's step (forward and backward) and,
        if adversarial, the discriminator's generator term and its own phase."""
        x_t, t, s = self.start(d)
        params = self.params()["student"]

        def student():
            self.student_step(x_t, t, s, d.cond).float().pow(2).mean().backward()
            clear_grads(params)

        passes = {"teacher_solve": no_grad_pass(lambda: self.teacher_target(x_t, d)), "student_fwd_bwd": student}
        critic = self.critic_at(0)
        if critic is not None:
            passes.update(self._critic_passes(critic, x_t, t, s, d))
        return passes

    def _critic_passes(self, critic, x_t, t, s, d):
        def generator_term():  # the student phase's discriminator pass, into the candidate
            critic.generator_loss(x_t.clone().requires_grad_(True), s, x_t, t, d.cond).backward()

        def critic_step():
            critic.critic_loss(x_t, x_t, s, x_t, t, d.cond).backward()
            clear_grads(critic.params())
        return {"generator_term_fwd_bwd": generator_term, f"{critic.phase}_fwd_bwd": critic_step}


def encoder_only(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` (a standalone copy) without its decoder, trainable: a discriminator's backbone."""
    unet.up_blocks = torch.nn.ModuleList()
    unet.conv_norm_out = unet.conv_act = unet.conv_out = None
    return unet.train().requires_grad_(True)


register("progressive", ProgressiveConfig, ProgressiveMethod)
