"""DMD2's GAN term: a classifier on the fake score's bottleneck that tells noised real images
from noised generator outputs, and the non-saturating generator term it gives G.

[DMD2, Yin et al. NeurIPS 2024, §4.3: a classification branch on the bottleneck of the fake
diffusion model, trained with real images; the generator adds -log D of its noised outputs.]
Where we differ: the fake score's features are read without gradient to its weights, so the
critic phase trains the head alone (DMD2 also trains the fake score's backbone with it), and
the generator's term reaches the student only through its images: its gradient g with
respect to the images is taken with ``torch.autograd.grad`` and applied as ⟨x, sg(g)⟩, so
no weight of the fake score collects a gradient in either phase.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hypersd.distill.data import map_cond
from hypersd.distill.methods.adversarial import FeatureHead


class BottleneckGAN:
    """The head, its phase name, and both losses; ``features(x_t, t, cond)`` is the fake
    score's bottleneck and ``noised(x, t, eps)`` the forward noising."""

    phase = "critic"

    def __init__(self, features, noised, probe, latent_shape: tuple[int, ...], hidden: int = 64):
        self.features, self.noised = features, noised
        n = len(probe.prompts)
        with torch.no_grad():
            shape = features(torch.zeros(n, *latent_shape), torch.full((n,), 999), probe.cond).shape
        self.head = FeatureHead(shape[1], shape[-1], hidden)
        self._forward = self.head

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    def wrapped(self, module) -> None:
        self._forward = module

    def logits(self, x_t, t, cond, forward=None) -> torch.Tensor:
        return (forward or self.head)(self.features(x_t, t, cond).float()).mean(dim=(1, 2, 3))

    def generator_loss(self, x, t, eps, cond) -> tuple[torch.Tensor, float]:
        """A loss whose gradient with respect to ``x`` is that of mean softplus(-D(x_t)), and
        its value."""
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            term = F.softplus(-self.logits(self.noised(leaf, t, eps), t, cond)).mean()
            (g,) = torch.autograd.grad(term, leaf)
        inner = (x.float() * g.float()).sum()
        return term.detach() + inner - inner.detach(), term.item()

    def critic_loss(self, real, fake, t, eps, cond) -> torch.Tensor:
        """softplus(-D(real_t)) + softplus(D(fake_t)): real and fake in one forward of the head
        (as accelerate wrapped it), so data-parallel wrappers see each parameter once."""
        two = lambda v: torch.cat([v, v])  # noqa: E731
        with torch.no_grad():
            x_t = self.noised(torch.cat([real, fake.detach()]), two(t), two(eps))
            feats = self.features(x_t, two(t), map_cond(two, cond)).float()
        real_logits, fake_logits = self._forward(feats).mean(dim=(1, 2, 3)).chunk(2)
        return (F.softplus(-real_logits) + F.softplus(fake_logits)).mean()

