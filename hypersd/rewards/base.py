"""The reward interface and its registry."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class Reward(nn.Module):
    """A frozen scorer of (image, prompt) pairs; subclasses implement ``score``."""

    needs_references = False           # True: ``score`` compares with real images

    def score(self, images: torch.Tensor, prompts: list[str],
              references: torch.Tensor | None = None) -> torch.Tensor:
        """One reward per image, differentiable with respect to ``images`` ([-1, 1])."""
        raise NotImplementedError

    def frozen(self) -> "Reward":
        return self.eval().requires_grad_(False)


REWARDS: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str, loader: Callable[..., Reward]) -> None:
    """``loader(path, model)`` builds the reward from its weights and backbone (None: defaults)."""
    REWARDS[name] = loader


def check_reward(name: str) -> None:
    """Raise ValueError naming the known rewards when ``name`` is not one of them."""
    import hypersd.rewards.mini  # noqa: F401 - each module registers its rewards
    import hypersd.rewards.real  # noqa: F401
    import hypersd.rewards.structure  # noqa: F401
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")


def load_reward(name: str, path: str | None = None, model: str | None = None) -> Reward:
    """A registered reward, frozen, from ``path`` (and ``model``) or its default weights."""
    check_reward(name)
    return REWARDS[name](path, model).frozen()
