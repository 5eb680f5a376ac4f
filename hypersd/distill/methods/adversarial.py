"""The adversarial term, a component any method can switch on: trainable heads on frozen
UNet-encoder features of (x_t, candidate), trained in a "critic" phase of their own.

[SDXL-Lightning §3.3: the discriminator reuses the diffusion UNet's encoder and mid block,
sees both x_t and the candidate x_{t_end} so it judges the flow, not just the image, and has
heads of 4x4 stride-2 conv + GroupNorm + SiLU; PCM keeps the backbone frozen and trains
only the heads.] Here the backbone is the frozen teacher; each encoder level (and the mid
block) gets a head on the channel-concatenated features of x_t and of the candidate. With
``conditional=False`` the heads see the candidate alone (Lightning's second phase).

Generator and critic are separate phases with their own optimizers; the critic's loss
trains the heads (and a backbone of its own, if given: ``methods/progressive.py``), and the
generator's loss reaches the student only through the candidate (the discriminator is
frozen while it is computed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypersd.distill.data import map_cond


def encoder_features(unet, x: torch.Tensor, t: torch.Tensor, cond: dict) -> list[torch.Tensor]:
    """Outputs of each down block and of the mid block of a UNet2DConditionModel."""
    ehs = cond["encoder_hidden_states"]
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs,
                             added_cond_kwargs=cond.get("added_cond_kwargs") or {})
    if aug is not None:
        emb = emb + aug
    h = unet.conv_in(x)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        feats.append(h)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
        else:
            h = unet.mid_block(h, emb)
        feats.append(h)
    return feats


def token_features(net, x: torch.Tensor, t: torch.Tensor, cond: dict, call) -> list[torch.Tensor]:
    """A FLUX, SD3 or Qwen-Image transformer's image-token states after each double-stream
    (joint) block and after its last single-stream block (FLUX's; the others have none), as
    (B, D, h, w) grids: the transformer's analogue of a UNet's encoder levels. ``t`` is the
    network's time; ``call`` its call convention."""
    singles = list(getattr(net, "single_transformer_blocks", []))[-1:]
    feats: list[torch.Tensor] = []
    grab = lambda module, args, out: feats.append(out[-1] if isinstance(out, tuple) else out)  # noqa: E731
    hooks = [b.register_forward_hook(grab) for b in [*net.transformer_blocks, *singles]]
    try:
        call(net, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    side = lambda n: int(round((n * x.shape[-2] / x.shape[-1]) ** 0.5))  # noqa: E731 (tokens per column)
    return [f.transpose(1, 2).reshape(len(f), f.shape[-1], side(f.shape[1]), -1) for f in feats]


class FeatureHead(nn.Sequential):
    """4x4 stride-2 conv + GroupNorm + SiLU, then a 1x1 conv to one logit per position."""

    def __init__(self, channels: int, size: int, hidden: int = 64):
        conv = (nn.Conv2d(channels, hidden, 4, 2, 1) if size >= 4 else nn.Conv2d(channels, hidden, 1))
        super().__init__(conv, nn.GroupNorm(min(32, hidden // 4), hidden), nn.SiLU(), nn.Conv2d(hidden, 1, 1))


@dataclass
class AdversarialConfig:
    """A stage's adversarial term (absent: none)."""

    weight: float = 0.1            # λ: the student's loss is w·d(prediction, target) + λ·generator term
    loss: str = "hinge"            # "hinge" or "nonsaturating"
    conditional: bool = True       # heads see (x_t, candidate); False: the candidate alone
    lr: float = 1e-4               # the critic heads' learning rate
    hidden: int = 64               # channels of each head

    def __post_init__(self):
        if self.loss not in ("hinge", "nonsaturating"):
            raise ValueError(f"adversarial loss must be hinge or nonsaturating, not {self.loss!r}")


class Discriminator(nn.Module):
    """Heads over encoder features; ``features(x, t, cond)`` is the backbone: a frozen one (the
    teacher's), or with ``backbone`` a UNet of its own whose encoder trains with the heads
    (SDXL-Lightning's discriminator)."""

    def __init__(self, features, probe: tuple[torch.Tensor, torch.Tensor, dict], cfg: AdversarialConfig,
                 backbone: nn.Module | None = None):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone
        self.features = features if backbone is None else (lambda x, t, c: encoder_features(self.backbone, x, t, c))
        with torch.no_grad():
            shapes = [f.shape for f in self.features(*probe)]
        mult = 2 if cfg.conditional else 1
        self.heads = nn.ModuleList(FeatureHead(mult * s[1], s[-1], cfg.hidden) for s in shapes)

    def forward(self, candidate, t_end, x_t, t, cond) -> torch.Tensor:
        """One logit per example (mean over heads and positions)."""
        feats = self.features(candidate, t_end.clamp(min=0), cond)
        if self.cfg.conditional:  # x_t's features train a backbone of its own, never a frozen one
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone is not None):
                ctx = self.features(x_t, t, cond)
            feats = [torch.cat([f, c], dim=1) for f, c in zip(feats, ctx)]
        return torch.stack([h(f.float()).mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats)]).mean(0)

    def generator_loss(self, fake, t_end, x_t, t, cond) -> torch.Tensor:
        """Per-example loss pushing the student's candidate to look real."""
        logits = self(fake, t_end, x_t, t, cond)
        return -logits if self.cfg.loss == "hinge" else F.softplus(-logits)

    def critic_loss(self, real, fake, t_end, x_t, t, cond, forward=None) -> torch.Tensor:
        """Per-example loss training the heads to tell real (target) from fake (student).

        Real and fake go through one forward (``forward``: this module as accelerate wrapped
        it), so data-parallel wrappers see each parameter used once per backward.
        """
        two = lambda v: torch.cat([v, v])  # noqa: E731
        logits = (forward or self)(torch.cat([real.detach(), fake.detach()]), two(t_end), two(x_t), two(t),
                                   map_cond(two, cond))
        real_logits, fake_logits = logits.chunk(2)
        if self.cfg.loss == "hinge":
            return F.relu(1 - real_logits) + F.relu(1 + fake_logits)
        return F.softplus(-real_logits) + F.softplus(fake_logits)


class AdversarialTerm:
    """A fresh critic for one stage (re-initialised every stage, as Lightning does): the
    discriminator, its phase name, and the generator/critic losses on a candidate."""

    def __init__(self, cfg: AdversarialConfig, features, probe, backbone: nn.Module | None = None,
                 phase: str = "critic"):
        self.cfg, self.phase = cfg, phase
        self.disc = Discriminator(features, (probe.latents, torch.tensor([999, 0]), probe.cond), cfg, backbone)
        self._forward = self.disc

    def params(self) -> list[nn.Parameter]:
        return list(self.disc.parameters())  # the heads (and a backbone of its own)

    def wrapped(self, module) -> None:
        self._forward = module

    def generator_loss(self, candidate, t_end, x_t, t, cond) -> torch.Tensor:
        """Mean generator term; the discriminator is frozen, so only the candidate's source learns."""
        self.disc.requires_grad_(False)
        try:
            return self.disc.generator_loss(candidate, t_end, x_t, t, cond).mean()
        finally:
            self.disc.requires_grad_(True)

    def critic_loss(self, real, fake, t_end, x_t, t, cond) -> torch.Tensor:
        return self.disc.critic_loss(real, fake, t_end, x_t, t, cond, forward=self._forward).mean()
