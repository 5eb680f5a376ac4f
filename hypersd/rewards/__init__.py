"""Reward models behind one interface, for feedback learning (``hypersd.distill.methods.feedback``).

A reward scores images for their prompts, ``reward.score(images, prompts) -> (N,)``, with
gradients to the images (float, (N, 3, H, W) in [-1, 1], any size: each reward resizes to
its own input). Higher is better. Rewards that compare an image with a reference image
(the structure reward) set ``needs_references`` and take ``references=`` of the same shape.
Weights are read when a reward is loaded, never at import time.
"""

from hypersd.rewards.base import REWARDS, Reward, check_reward, load_reward, register_reward

__all__ = ["REWARDS", "Reward", "check_reward", "load_reward", "register_reward"]
