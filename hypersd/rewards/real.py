"""The published reward models, differentiable: CLIP score, the LAION aesthetic predictor and
ImageReward. Each wraps the metric of the same name (``hypersd.metrics``), whose weights it
loads the same way, and preprocesses tensors instead of PIL images so that gradients reach
the images. A term's ``path`` is the metric's weights (a CLIP folder or hub id; the
aesthetic head's .pth; ImageReward.pt) and ``model`` the backbone where one is needed (the
aesthetic predictor's CLIP ViT-L/14, ImageReward's BLIP).
"""

from __future__ import annotations

import torch

from hypersd.metrics.imagereward import ImageReward
from hypersd.metrics.real import CLIP_B32, CLIP_L14, AestheticScore, ClipScore, clip_tensor
from hypersd.rewards.base import Reward, register_reward


class _MetricReward(Reward):
    """A metric's model as a frozen module, so ``frozen()`` reaches its weights."""

    def __init__(self, metric, module: torch.nn.Module):
        super().__init__()
        self.metric, self.backbone = metric, module


class ClipReward(_MetricReward):
    """cos(image, prompt) under CLIP (Hyper-SD's CLIP score / 100, without the clamp at 0)."""

    def score(self, images, prompts, references=None):
        return self.metric.cosine(clip_tensor(images, self.metric.size), prompts)


class AestheticReward(_MetricReward):
    """The LAION aesthetic score, about 1 to 10."""

    def score(self, images, prompts, references=None):
        return self.metric.predict(clip_tensor(images, self.metric.size))


class ImageRewardReward(_MetricReward):
    """ImageReward, standardised (about N(0, 1) on its authors' data)."""

    def score(self, images, prompts, references=None):
        return self.metric.reward(clip_tensor(images, self.metric.size), prompts)


def _clip(path=None, model=None) -> ClipReward:
    metric = ClipScore.from_pretrained(path or CLIP_B32)
    return ClipReward(metric, metric.model)


def _aesthetic(path=None, model=None) -> AestheticReward:
    if path is None:
        raise ValueError("the aesthetic reward needs its head's weights: path: sac+logos+ava1-l14-linearMSE.pth")
    metric = AestheticScore.from_pretrained(path, model or CLIP_L14)
    return AestheticReward(metric, torch.nn.ModuleList([metric.model, metric.head]))


def _imagereward(path=None, model=None) -> ImageRewardReward:
    if path is None:
        raise ValueError("ImageReward needs its weights: path: ImageReward.pt")
    metric = ImageReward.from_pretrained(path, **({"blip": model} if model else {}))
    return ImageRewardReward(metric, torch.nn.ModuleList([metric.blip, metric.head]))


register_reward("clip", _clip)
register_reward("aesthetic", _aesthetic)
register_reward("imagereward", _imagereward)
