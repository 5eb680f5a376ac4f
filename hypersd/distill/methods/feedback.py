"""Human feedback learning (ReFL) as a method: the student's few-step samples, scored by reward
models through the VAE decoder, push the student towards what the rewards prefer.

One example, with the student's own sampler (TCD at γ = ``eta``, as the unified LoRA is run):
  1. draw a step count k from ``step_counts`` and a step i < k; from pure noise, run the
     first i steps of the k-step sampler without gradient;
  2. at step i the student predicts x̂₀ with gradient; the VAE decodes it (with gradient);
  3. each reward r scores the image for its prompt: loss Σ w_r · ReLU(α_r - r).
Rewards that compare with a real image (the structure reward) score instead the student's x̂₀
from that image's latents noised to t ~ U[``reference_t``], against the image itself
(Hyper-SD's perceptual feedback: noise a real image, predict x̂₀, compare the segmentations).
``anchor_weight`` adds ‖x̂₀ - x̂₀_anchor‖², the distance to the student as the stage found it
(the frozen "target" role), against drift from the distilled model.

[ImageReward, Xu et al. NeurIPS 2023, §4 (ReFL: gradient at one late step, ReLU(λ - r));
Hyper-SD §3.2 (feedback on the few-step student, with aesthetic and perceptual rewards).]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hypersd.distill.data import Batch
from hypersd.distill.latents import decode
from hypersd.distill.protocol import Method, StageContext, clear_grads, no_grad_pass, register
from hypersd.distill.schedule import tcd_timesteps
from hypersd.rewards import check_reward, load_reward


@dataclass
class RewardTerm:
    name: str = "mini-adherence"       # a registered reward (``hypersd.rewards``)
    weight: float = 1.0
    alpha: float = 1.0                 # ReLU(α - r): no push once the reward reaches α
    path: str | None = None            # its weights (None: the reward's default)
    model: str | None = None           # its backbone, where it has one (aesthetic: CLIP; ImageReward: BLIP)

    def __post_init__(self):
        check_reward(self.name)


class RewardLoss:
    """Σ_r w_r · ReLU(α_r - r) over reward models, on latents decoded by the VAE (with gradient)."""

    def __init__(self, terms: list[RewardTerm], vae):
        if vae is None:
            raise ValueError("reward terms score decoded images: the stage needs the base model's VAE")
        self.terms, self.vae = terms, vae
        self.rewards = [load_reward(r.name, r.path, r.model) for r in terms]
        self.needs_references = any(r.needs_references for r in self.rewards)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], as the family's pipeline decodes them (``distill.latents``)."""
        return decode(self.vae, x0).clamp(-1, 1)

    def __call__(self, x0: torch.Tensor, prompts: list[str], references: torch.Tensor | None = None):
        """The loss of the rewards that compare with ``references`` (given) or not (None), and logs."""
        images = self.decode(x0)
        loss, logs = images.new_zeros(()), {}
        for term, reward in zip(self.terms, self.rewards):
            if reward.needs_references != (references is not None):
                continue
            r = reward.score(images, prompts, references=references)
            loss = loss + term.weight * F.relu(term.alpha - r).mean()
            logs[f"reward/{term.name}"] = r.mean().item()
        return loss, logs


@dataclass
class FeedbackConfig:
    """Reward feedback on the student's own few-step samples [Hyper-SD §3.2]."""

    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    step_counts: tuple[int, ...] = (1, 2, 4, 8)  # the sampler step counts the gradient step comes from
    eta: float = 1.0                   # the TCD sampler's γ for the steps without gradient
    anchor_weight: float = 0.0         # weight of ‖x̂₀ - x̂₀ of the stage's starting student‖²
    reference_t: tuple[int, int] = (250, 750)  # where real images are noised for reference rewards
    recipe: str = "hyper-sd-unified"
    steps_served: str = "1-8"

    def __post_init__(self):
        self.rewards = [r if isinstance(r, RewardTerm) else RewardTerm(**r) for r in self.rewards]
        if not self.rewards or not self.step_counts or min(self.step_counts) < 1:
            raise ValueError("feedback needs at least one reward and positive step counts")


@dataclass
class FeedbackDraw:
    prompts: list[str]
    cond: dict
    z: torch.Tensor                    # pure noise at the sampler's first timestep
    renoise: torch.Tensor              # (N, max k - 1, ...) the sampler's fresh noise per step
    k: int                             # the sampler's step count
    i: int                             # the step that takes the gradient
    latents: torch.Tensor | None = None  # real images' latents (reference rewards only)
    t_ref: torch.Tensor | None = None  # and where they are noised to
    eps_ref: torch.Tensor | None = None


class FeedbackMethod(Method):
    """One phase, "student"; the frozen "target" role keeps the starting student (the anchor)."""

    needs_images = False

    def __init__(self, cfg: FeedbackConfig, ctx: StageContext):
        super().__init__(cfg, ctx)
        self.rewards = RewardLoss(cfg.rewards, ctx.vae)
        self.needs_images = self.rewards.needs_references
        self.student, self.anchor = (ctx.denoiser(r) for r in ("student", "target"))
        self.shape = ctx.latent_shape

    def sample(self, batch: Batch, g: torch.Generator) -> FeedbackDraw:
        n, counts = len(batch.prompts), self.cfg.step_counts
        k = counts[int(torch.randint(len(counts), (1,), generator=g))]
        i = int(torch.randint(k, (1,), generator=g))
        dev = batch.cond["encoder_hidden_states"].device
        z = torch.randn(n, *self.shape, generator=g).to(dev)
        renoise = torch.randn(n, max(max(counts) - 1, 1), *self.shape, generator=g).to(dev)
        d = FeedbackDraw(batch.prompts, batch.cond, z, renoise, k, i)
        if self.needs_images:
            lo, hi = self.cfg.reference_t
            d.latents, d.t_ref = batch.latents, torch.randint(lo, hi + 1, (n,), generator=g).to(dev)
            d.eps_ref = torch.randn(batch.latents.shape, generator=g).to(dev)
        return d

    def loss(self, phase: str, d: FeedbackDraw):
        pairs = tcd_timesteps(d.k, self.cfg.eta)
        x = self._presample(d, pairs)
        t = torch.full((len(x),), pairs[d.i][0], device=x.device)
        x0 = self.student(x, t, d.cond).x0
        loss, logs = self.rewards(x0, d.prompts)
        logs.update(k=float(d.k), i=float(d.i))
        if self.needs_images:
            x0_ref = self.student(self.student.noised(d.latents, d.t_ref, d.eps_ref), d.t_ref, d.cond).x0
            with torch.no_grad():
                real = self.rewards.decode(d.latents)
            ref_loss, ref_logs = self.rewards(x0_ref, d.prompts, references=real)
            loss, logs = loss + ref_loss, {**logs, **ref_logs}
        if self.cfg.anchor_weight:
            with torch.no_grad():
                anchor = self.anchor(x, t, d.cond).x0
            drift = F.mse_loss(x0.float(), anchor.float())
            loss = loss + self.cfg.anchor_weight * drift
            logs["anchor"] = drift.item()
        return loss, logs

    @torch.no_grad()
    def _presample(self, d: FeedbackDraw, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """The first ``d.i`` steps of the k-step TCD sampler: predict x_s, re-noise to the next t."""
        x = d.z
        for j in range(d.i):
            (t, s), t_next = pairs[j], pairs[j + 1][0]
            at = lambda v: torch.full((len(x),), v, device=x.device)  # noqa: E731
            x_s = self.student.step(self.student(x, at(t), d.cond), at(s))
            x = self.student.process.renoise(x_s, at(s), at(t_next), d.renoise[:, j])
        return x

    def export_info(self):
        return {"recipe": self.cfg.recipe, "steps_served": self.cfg.steps_served}

    def passes(self, d: FeedbackDraw):
        """The i sampler steps without gradient, then x̂₀, decode and rewards forward and backward."""
        pairs, params = tcd_timesteps(d.k, self.cfg.eta), self.params()["student"]
        x, t = d.z, torch.full((len(d.z),), pairs[d.i][0], device=d.z.device)

        def gradient_step():
            self.rewards(self.student(x, t, d.cond).x0, d.prompts)[0].backward()
            clear_grads(params)
        passes = {f"sampler_step_{j}": no_grad_pass(lambda: self.student(x, t, d.cond)) for j in range(d.i)}
        passes["gradient_step_fwd_bwd"] = gradient_step
        if self.needs_images:  # the reference rewards' path: real latents noised to t_ref
            def reference_step():
                real = self.rewards.decode(d.latents).detach()
                x0 = self.student(d.latents, d.t_ref, d.cond).x0
                self.rewards(x0, d.prompts, references=real)[0].backward()
                clear_grads(params)
            passes["reference_step_fwd_bwd"] = reference_step
        if self.cfg.anchor_weight:
            passes["anchor"] = no_grad_pass(lambda: self.anchor(x, t, d.cond))
        return passes


register("feedback", FeedbackConfig, FeedbackMethod)
