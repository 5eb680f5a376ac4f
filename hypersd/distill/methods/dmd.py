"""Distribution matching distillation as a method: Hyper-SD's one-step enhancement, and DMD2.

A one-step generator G (the student, fed pure noise labelled with ``input_timestep``) learns
from two score models of its noised outputs: the frozen teacher with CFG (the real score) and
a trainable fake score (a second adapter on the same UNet, starting as the teacher) that keeps
fitting G's current outputs with the ordinary denoising loss. At x = G(z) noised to
x_t = √ᾱ_t x + √(1-ᾱ_t) ε, t ~ U[t_min, t_max]:

    grad = (x̂₀_fake - x̂₀_real) / mean|x - x̂₀_real|     (per example, DMD2's normalisation)
    L_dm = ½‖x - sg(x - grad)‖²                          (so ∂L_dm/∂x = grad)

With ``regression_weight`` > 0 the generator also regresses onto the teacher's multi-step
outputs from the same noise, ‖G(z') - ODE_teacher(z')‖², on a pool of (prompt, noise) pairs
solved once when the stage starts (DMD's regression loss; Hyper-SD's MSE regulariser).
With ``gan_weight`` > 0 a classifier on the fake score's bottleneck learns to tell noised
real images from noised G(z) in a "critic" phase, and G adds its non-saturating term
(DMD2's GAN term, ``methods.gan``); the stage then needs images.
With ``anchor_weight`` > 0 the student's x̂₀ at the pool's outputs noised to t (below the
input timestep, where a multi-step sampler's later steps feed it) is held to the stage's
starting student (the frozen "target" role), so that a unified LoRA keeps serving 2 to 8 steps.
With ``rewards`` the generator's images (decoded) are also scored by reward models, as in
feedback learning (Hyper-SD trains its one-step enhancement with the feedback terms). The
fake score takes a step every optimizer step, the generator every ``update_ratio`` steps
(DMD2's two time-scale update rule).

[DMD, Yin et al. CVPR 2024, §3; DMD2, Yin et al. NeurIPS 2024, §4.1-4.2; Hyper-SD §3.3.]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypersd.distill.data import Batch, map_cond
from hypersd.distill.denoiser import cat_cond
from hypersd.distill.methods.feedback import RewardLoss, RewardTerm
from hypersd.distill.methods.gan import BottleneckGAN
from hypersd.distill.protocol import Method, StageContext, clear_grads, no_grad_pass, register
from hypersd.distill.schedule import T, multistep_path


@dataclass
class DMDConfig:
    """One-step enhancement of a student by distribution matching [Hyper-SD §3.3]."""

    real_guidance: float = 3.0         # the teacher's CFG scale as the real score (<= 1: none)
    update_ratio: int = 5              # fake-score steps per generator step (DMD2: 5)
    fake_lr: float | None = None       # the fake score's learning rate (None: the stage's lr)
    t_range: tuple[int, int] = (20, 980)  # where G's outputs are noised (DMD2: 0.02T to 0.98T)
    input_timestep: int = 999          # the timestep label of G's pure-noise input
    dm_weight: float = 1.0             # weight of L_dm
    regression_weight: float = 0.25    # weight of the regression onto the teacher (0: none)
    pool_size: int = 512               # (prompt, noise) pairs the teacher solves for the regression
    pool_steps: int = 25               # the teacher's DDIM steps for each pair
    pool_seed: int = 0
    rewards: list[RewardTerm] = field(default_factory=list)  # feedback terms on G's images
    gan_weight: float = 0.0            # weight of G's GAN term (0: no GAN term; DMD2 SDXL: 5e-3)
    gan_lr: float | None = None        # the classifier head's learning rate (None: the fake score's)
    gan_hidden: int = 64               # channels of the classifier head
    anchor_weight: float = 0.0         # weight of ‖x̂₀ - x̂₀ of the stage's starting student‖² below
                                       # the input timestep (keeps what multi-step sampling needs)
    recipe: str = "hyper-sd-unified"   # how the student is sampled
    steps_served: str = "1-8"

    def __post_init__(self):
        lo, hi = self.t_range
        if not 0 <= lo <= hi < T:
            raise ValueError(f"t_range must lie in [0, {T - 1}], got {self.t_range}")
        if self.update_ratio < 1:
            raise ValueError("update_ratio must be at least 1")
        if not 0 <= self.input_timestep < T:
            raise ValueError(f"input_timestep must lie in [0, {T - 1}]")
        self.rewards = [r if isinstance(r, RewardTerm) else RewardTerm(**r) for r in self.rewards]


@dataclass
class DMD2Config(DMDConfig):
    """DMD2: distribution matching from the teacher directly, no regression [DMD2 §4]."""

    regression_weight: float = 0.0
    steps_served: str = "1"


@dataclass
class DMDDraw:
    """Every random draw of one step, batch-first."""

    prompts: list[str]
    cond: dict
    uncond: dict
    z: torch.Tensor                    # G's input noise
    t: torch.Tensor                    # where G's output is noised for L_dm
    eps: torch.Tensor
    t_fake: torch.Tensor               # and for the fake score's denoising loss
    eps_fake: torch.Tensor
    reg_z: torch.Tensor | None = None  # regression pairs from the pool (None: no regression)
    reg_x0: torch.Tensor | None = None
    reg_cond: dict | None = None
    real: torch.Tensor | None = None   # real latents, for the GAN term (None: no GAN term)
    generated: torch.Tensor | None = None  # G(z), detached, set by the generator or fake phase


@dataclass
class Pool:
    z: torch.Tensor
    x0: torch.Tensor
    cond: dict


class DMDMethod(Method):
    """Phases "student" (the generator, every ``update_ratio`` steps), "fake" (every step) and,
    with the GAN term, "critic" (every step, after the fake score)."""

    needs_images = False
    unused_parameters = True           # student and fake score are two adapters of one UNet

    def __init__(self, cfg: DMDConfig, ctx: StageContext):
        super().__init__(cfg, ctx)
        ctx.nets.add_role("fake", trainable=True)  # starts as the teacher [DMD §3.2]
        roles = ("student", "teacher", "fake", "target")
        self.student, self.teacher, self.fake, self.anchor = (ctx.denoiser(r) for r in roles)
        self.shape = ctx.latent_shape
        self.pool = self._teacher_pool() if cfg.regression_weight or cfg.anchor_weight else None
        self.rewards = RewardLoss(cfg.rewards, ctx.vae) if cfg.rewards else None
        if self.rewards is not None and self.rewards.needs_references:
            raise ValueError("DMD trains from prompts: its reward terms cannot compare with real images")
        self.gan = None
        if cfg.gan_weight > 0:  # DMD2's classifier on the fake score's bottleneck [DMD2 §4.3]
            self.gan = BottleneckGAN(lambda x, t, c: ctx.nets.features("fake", x, t, c)[-1],
                                     self.teacher.noised, ctx.probe, self.shape, cfg.gan_hidden)
            self.needs_images = True

    # ---- the protocol --------------------------------------------------------------------
    def phases(self, step: int) -> list[str]:
        phases = ["student", "fake"] if step % self.cfg.update_ratio == 0 else ["fake"]
        return phases + ["critic"] * (self.gan is not None)

    def params(self):
        params = {role: self.ctx.nets.trainable(role) for role in ("student", "fake")}
        return params | ({"critic": self.gan.params()} if self.gan else {})

    def modules(self):
        modules = {role: self.ctx.nets.module(role) for role in ("student", "fake")}
        return modules | ({"critic": self.gan.head} if self.gan else {})

    def wrapped(self, phase: str, module) -> None:
        if phase == "critic":
            self.gan.wrapped(module)
        else:
            self.ctx.nets.use_wrapped(phase, module)

    def optimizer_settings(self, lr: float):
        fake_lr = self.cfg.fake_lr or lr
        return {"student": {"lr": lr}, "fake": {"lr": fake_lr}, "critic": {"lr": self.cfg.gan_lr or fake_lr}}

    def sample(self, batch: Batch, g: torch.Generator) -> DMDDraw:
        n, (lo, hi) = len(batch.prompts), self.cfg.t_range
        dev = batch.cond["encoder_hidden_states"].device
        noise = lambda: torch.randn(n, *self.shape, generator=g).to(dev)  # noqa: E731
        times = lambda a, b: torch.randint(a, b + 1, (n,), generator=g).to(dev)  # noqa: E731
        d = DMDDraw(batch.prompts, batch.cond, batch.uncond, z=noise(), t=times(lo, hi), eps=noise(),
                    t_fake=times(0, T - 1), eps_fake=noise(), real=batch.latents if self.gan else None)
        if self.pool is not None:
            idx = torch.randint(len(self.pool.z), (n,), generator=g)
            d.reg_z, d.reg_x0 = self.pool.z[idx].to(dev), self.pool.x0[idx].to(dev)
            d.reg_cond = map_cond(lambda v: v[idx].to(dev), self.pool.cond)
        return d

    def loss(self, phase: str, d: DMDDraw):
        if phase == "critic":
            loss = self.gan.critic_loss(d.real, d.generated, d.t, d.eps, d.cond)
            return loss, {"critic": loss.item()}
        return self._fake_loss(d) if phase == "fake" else self._generator_loss(d)

    def state_dict(self):
        return {"fake": self.ctx.nets.state("fake")} | ({"critic": self.gan.head.state_dict()} if self.gan else {})

    def load_state_dict(self, state) -> None:
        self.ctx.nets.load_state("fake", state["fake"])
        if self.gan:
            self.gan.head.load_state_dict(state["critic"])

    def close(self) -> None:
        self.ctx.nets.drop_role("fake")

    def export_info(self):
        cfg = self.cfg
        return {"recipe": cfg.recipe, "steps_served": cfg.steps_served, "input_timestep": cfg.input_timestep}

    # ---- losses --------------------------------------------------------------------------
    def generate(self, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """G(z): the student's x̂₀ from pure noise at the input timestep."""
        t = torch.full((len(z),), self.cfg.input_timestep, device=z.device)
        return self.student(z, t, cond).x0

    def _anchor_input(self, d: DMDDraw) -> torch.Tensor | None:
        """The anchor's inputs: the pool's outputs noised to the draw's t (None: no anchor)."""
        if not self.cfg.anchor_weight:
            return None
        m = len(d.reg_z)
        return self.teacher.noised(d.reg_x0, d.t[:m], d.eps[:m])

    def _student_pass(self, d: DMDDraw, anchor_in: torch.Tensor | None):
        """One student forward for every generator term: G(z), G(z') of the regression pairs,
        and x̂₀ at ``anchor_in`` (the anchor's inputs)."""
        n, m = len(d.z), 0 if self.pool is None else len(d.reg_z)
        full = lambda k, v: torch.full((k,), v, device=d.z.device)  # noqa: E731
        x, t, cond = [d.z], [full(n, self.cfg.input_timestep)], d.cond
        if self.pool is not None:
            x.append(d.reg_z)
            t.append(full(m, self.cfg.input_timestep))
            cond = cat_cond(cond, d.reg_cond)
        if anchor_in is not None:
            x.append(anchor_in)
            t.append(d.t[:m])
            cond = cat_cond(cond, d.reg_cond)
        out = self.student(torch.cat(x), torch.cat(t), cond).x0
        return out[:n], out[n:n + m], out[n + m:]

    def _generator_loss(self, d: DMDDraw):
        cfg = self.cfg
        anchor_in = self._anchor_input(d)
        x, x_reg, x_anchor = self._student_pass(d, anchor_in)
        d.generated = x.detach()
        dm, logs = self._distribution_matching(x, d)
        loss = cfg.dm_weight * dm
        if self.pool is not None:
            reg = F.mse_loss(x_reg.float(), d.reg_x0.float())
            loss = loss + cfg.regression_weight * reg
            logs["regression"] = reg.item()
        if anchor_in is not None:
            with torch.no_grad():
                anchor = self.anchor(anchor_in, d.t[:len(anchor_in)], d.reg_cond).x0
            drift = F.mse_loss(x_anchor.float(), anchor.float())
            loss = loss + cfg.anchor_weight * drift
            logs["anchor"] = drift.item()
        if self.rewards is not None:
            feedback, reward_logs = self.rewards(x, d.prompts)
            loss, logs = loss + feedback, {**logs, **reward_logs}
        if self.gan is not None:
            gan, logs["gan"] = self.gan.generator_loss(x, d.t, d.eps, d.cond)
            loss = loss + cfg.gan_weight * gan
        return loss, logs

    def _distribution_matching(self, x: torch.Tensor, d: DMDDraw):
        """½‖x - sg(x - grad)‖², grad = (x̂₀_fake - x̂₀_real) / mean|x - x̂₀_real|."""
        with torch.no_grad():
            x_t = self.teacher.noised(x.detach(), d.t, d.eps)
            guided = (d.uncond, self.cfg.real_guidance) if self.cfg.real_guidance > 1 else ()
            real = self.teacher(x_t, d.t, d.cond, *guided).x0
            fake = self.fake(x_t, d.t, d.cond).x0
            dims = tuple(range(1, x.ndim))
            scale = (x.detach() - real).abs().mean(dim=dims, keepdim=True)
            grad = torch.nan_to_num((fake - real) / scale)
        loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
        return loss, {"dm": loss.item(), "dm_grad": grad.abs().mean().item(), "t": d.t.float().mean().item()}

    def _fake_loss(self, d: DMDDraw):
        """The fake score's denoising loss on G's current outputs, in its own parameterisation."""
        if d.generated is None:
            with torch.no_grad():
                d.generated = self.generate(d.z, d.cond)
        x = d.generated
        pred = self.fake(self.teacher.noised(x, d.t_fake, d.eps_fake), d.t_fake, d.cond)
        target = self.fake.target
        loss = F.mse_loss(target(pred.x0, pred.eps, d.t_fake).float(), target(x, d.eps_fake, d.t_fake).float())
        return loss, {"fake": loss.item()}

    @torch.no_grad()
    def _teacher_pool(self, chunk: int = 64) -> Pool:
        """(prompt, noise) pairs and the teacher's ``pool_steps``-step guided DDIM solve of each,
        from pure noise at T to the clean image; the same pairs on every run of the stage."""
        cfg, data = self.cfg, self.ctx.data
        if data is None:
            raise ValueError("the regression pool needs the run's prompts (StageContext.data)")
        g = torch.Generator().manual_seed(cfg.pool_seed)
        batch = data.sample(cfg.pool_size, g)
        z = torch.randn(cfg.pool_size, *self.shape, generator=g)
        path = multistep_path(T - 1, -1, cfg.pool_steps)
        guidance = cfg.real_guidance if cfg.real_guidance > 1 else None
        dev = batch.cond["encoder_hidden_states"].device
        x0 = []
        for i in tqdm(range(0, cfg.pool_size, chunk), desc="teacher pool", leave=False):
            part = lambda c: map_cond(lambda v: v[i:i + chunk], c)  # noqa: E731
            x0.append(self.teacher.solve(z[i:i + chunk].to(dev), path, part(batch.cond), part(batch.uncond),
                                         guidance).cpu())
        return Pool(z, torch.cat(x0), map_cond(lambda v: v.cpu(), batch.cond))

    def passes(self, d: DMDDraw):
        """The passes of a step with both phases: G forward and backward (with the regression
        pairs and anchor inputs), the real and fake scores (and the anchor's), the reward terms'
        decode and scoring with their backward, the fake score's forward and backward. (A
        fake-only step runs G without gradient instead.)"""
        cond, params = d.cond, self.params()
        guided = (d.uncond, self.cfg.real_guidance) if self.cfg.real_guidance > 1 else ()

        def generator():
            torch.cat(self._student_pass(d, self._anchor_input(d))).float().pow(2).mean().backward()
            clear_grads(params["student"])

        def fake_step():
            self.fake(d.z, d.t_fake, cond).eps.float().pow(2).mean().backward()
            clear_grads(params["fake"])
        passes = {"generator_fwd_bwd": generator,
                  "real_score": no_grad_pass(lambda: self.teacher(d.z, d.t, cond, *guided)),
                  "fake_score": no_grad_pass(lambda: self.fake(d.z, d.t, cond)),
                  "fake_fwd_bwd": fake_step}
        if self.cfg.anchor_weight:
            passes["anchor_score"] = no_grad_pass(lambda: self.anchor(d.reg_z, d.t, d.reg_cond))
        if self.rewards is not None:  # decode G's images and score them, back to the latents
            passes["rewards_fwd_bwd"] = lambda: self.rewards(d.z.clone().requires_grad_(True), d.prompts)[0].backward()
        if self.gan is not None:
            def critic_step():
                self.gan.critic_loss(d.real, d.z, d.t, d.eps, cond).backward()
                clear_grads(params["critic"])
            passes["gan_generator_bwd"] = lambda: self.gan.generator_loss(d.z, d.t, d.eps, cond)
            passes["critic_fwd_bwd"] = critic_step
        return passes


register("dmd", DMDConfig, DMDMethod)
register("dmd2", DMD2Config, DMDMethod)
