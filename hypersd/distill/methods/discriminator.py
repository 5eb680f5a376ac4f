"""SDXL-Lightning's discriminator: a trainable copy of the UNet's encoder and mid block, with a
head on each level, that tells the teacher's landing point from the student's.

[SDXL-Lightning, Lin et al. 2024: the backbone is the diffusion UNet's encoder and mid
block, initialised from the teacher and trained (not frozen); it judges the candidate
x_{t-ns} at its timestep together with x_t at t, so it learns the flow and not only the
image; each level gets a 4x4 stride-2 conv + GroupNorm + SiLU head; the loss is
non-saturating; a fresh discriminator starts every stage. Its unconditional objective shows
the candidate alone, which the paper uses to remove the conditional one's "Janus" artifacts.]

The candidate's features and x_t's are concatenated per level before its head. In the
generator's term every parameter of the discriminator is frozen, so the student learns through
the candidate only; in the critic's phase real and fake pass through one forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypersd.distill.data import map_cond
from hypersd.distill.methods.adversarial import FeatureHead, encoder_features


def encoder_only(unet: nn.Module) -> nn.Module:
    """``unet`` (a standalone copy) without its decoder: the up blocks and output layers go."""
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out = unet.conv_act = unet.conv_out = None
    return unet


class EncoderDiscriminator(nn.Module):
    """A logit per example for candidates ``x_s`` at ``s`` (conditional: beside ``x_t`` at ``t``)."""

    def __init__(self, unet: nn.Module, probe: tuple, conditional: bool, hidden: int = 64):
        super().__init__()
        self.conditional = conditional
        self.backbone = encoder_only(unet).train().requires_grad_(True)
        with torch.no_grad():
            shapes = [f.shape for f in encoder_features(self.backbone, *probe)]
        mult = 2 if conditional else 1
        self.heads = nn.ModuleList(FeatureHead(mult * s[1], s[-1], hidden) for s in shapes)

    def forward(self, x_s, s, x_t, t, cond) -> torch.Tensor:
        feats = encoder_features(self.backbone, x_s, s.clamp(min=0), cond)
        if self.conditional:
            context = encoder_features(self.backbone, x_t, t, cond)
            feats = [torch.cat([f, c], dim=1) for f, c in zip(feats, context)]
        return torch.stack([h(f.float()).mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats)]).mean(0)


class LightningCritic:
    """One stage's discriminator, the name of its phase, and the two non-saturating losses."""

    def __init__(self, phase: str, unet: nn.Module, probe: tuple, conditional: bool, hidden: int = 64):
        self.phase = phase
        self.disc = EncoderDiscriminator(unet, probe, conditional, hidden)
        self._forward = self.disc

    def params(self) -> list[nn.Parameter]:
        return list(self.disc.parameters())

    def wrapped(self, module) -> None:
        self._forward = module

    def generator_loss(self, fake, s, x_t, t, cond) -> torch.Tensor:
        """mean softplus(-D(fake)): the discriminator is frozen, only the candidate's source learns."""
        self.disc.requires_grad_(False)
        try:
            return F.softplus(-self.disc(fake, s, x_t, t, cond)).mean()
        finally:
            self.disc.requires_grad_(True)

    def critic_loss(self, real, fake, s, x_t, t, cond) -> torch.Tensor:
        """mean softplus(-D(real)) + softplus(D(fake)), both in one forward of the wrapped module."""
        two = lambda v: torch.cat([v, v])  # noqa: E731
        logits = self._forward(torch.cat([real.detach(), fake.detach()]), two(s), two(x_t), two(t),
                               map_cond(two, cond))
        real_logits, fake_logits = logits.chunk(2)
        return (F.softplus(-real_logits) + F.softplus(fake_logits)).mean()
