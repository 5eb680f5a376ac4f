"""The mini world's structure reward: a small segmentation network of emoji foregrounds.

Hyper-SD's perceptual feedback runs an instance-segmentation model on the image the student
predicts from a noised real image and on the real image, and rewards agreement of the two.
Here the segmenter is a small encoder-decoder trained on emoji32's distill split to predict
each emoji's alpha channel (its foreground mask) with photometric augmentation (blur,
noise, colour), so it also reads imperfect generations. The reward is the soft IoU of its
masks for the image and for the reference, Σ min(p, q) / Σ max(p, q), in [0, 1].

    hypersd train-reward structure     # writes hypersd/assets/rewards/mini-structure

At real scale the segmenter is Mask2Former (``mask2former``; transformers ships it, with
published COCO instance-segmentation weights). Hyper-SD names SOLO, which transformers does
not have; Mask2Former is the instance segmenter it does have, and its per-query masks and
class scores give the same foreground map: max over queries of P(object) · σ(mask logit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypersd.rewards.base import Reward, register_reward
from hypersd.rewards.mini import REWARDS_DIR, RewardTraining, _conv, _load, _save, _split_tensors, fit

STRUCTURE_DIR = REWARDS_DIR / "mini-structure"


class Segmenter(nn.Module):
    """32x32 RGB in [-1, 1] -> foreground logits (N, 1, 32, 32); other sizes are resized."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.down1, self.down2 = _conv(3, w, 1), _conv(w, 2 * w, 2)
        self.mid = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, 1))
        self.up2 = _conv(4 * w + 2 * w, 2 * w, 1)
        self.up1 = _conv(2 * w + w, w, 1)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        a = self.down1(x)
        b = self.down2(a)
        up = lambda h, skip: torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], 1)  # noqa: E731
        h = self.up2(up(self.mid(b), b))
        return self.out(self.up1(up(h, a)))


def soft_iou(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ min(p, q) / Σ max(p, q) per example, for masks in [0, 1]."""
    dims = tuple(range(1, p.ndim))
    return torch.minimum(p, q).sum(dims) / torch.maximum(p, q).sum(dims).clamp(min=1e-6)


class MiniStructure(Reward):
    """Agreement of the foreground masks of an image and of its reference."""

    needs_references = True

    def __init__(self, model: Segmenter):
        super().__init__()
        self.model = model

    def score(self, images, prompts, references=None) -> torch.Tensor:
        if references is None:
            raise ValueError("the structure reward compares with a reference image: pass references=")
        with torch.no_grad():
            target = torch.sigmoid(self.model(references.float()))
        return soft_iou(torch.sigmoid(self.model(images.float())), target)

    @classmethod
    def load(cls, path: str | None = None, model: str | None = None) -> "MiniStructure":
        return cls(_load(Path(path or STRUCTURE_DIR), lambda c: Segmenter(c["width"]), "structure"))


@dataclass
class StructureConfig(RewardTraining):
    out_dir: str = str(STRUCTURE_DIR)
    steps: int = 600
    batch_size: int = 128
    width: int = 16


def photometric(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, colour gain and bias, and noise on [-1, 1]; the geometry (the mask) is unchanged."""
    n = len(x)
    k = torch.tensor([1.0, 2.0, 1.0])
    soft = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), ((k[:, None] * k) / 16).expand(3, 1, 3, 3), groups=3)
    x = torch.where((torch.rand(n, generator=g) < 0.5)[:, None, None, None], soft, x)
    gain = 1 + 0.2 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    bias = 0.2 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    noise = 0.1 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return (x * gain + bias + noise).clamp(-1, 1)


def train_structure(cfg: StructureConfig) -> Path:
    """BCE against the alpha masks of the distill split; writes weights and the IoU on each split."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, _, masks = _split_tensors("distill", masks=True)
    model = Segmenter(cfg.width)
    fit(model, cfg, len(images),
        lambda idx, g: F.binary_cross_entropy_with_logits(model(photometric(images[idx], g)), masks[idx]),
        "structure reward")
    return _save(model, cfg, {"mask_iou": {split: mask_iou(model, split) for split in ("distill", "eval")}})


@torch.no_grad()
def mask_iou(model: Segmenter, split: str) -> float:
    """Mean soft IoU of the predicted and the true foreground masks of a split."""
    images, _, masks = _split_tensors(split, masks=True)
    return float(soft_iou(torch.sigmoid(model(images)), masks).mean())


MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Mask2FormerStructure(Reward):
    """Soft IoU of Mask2Former's foreground maps of an image and of its reference."""

    needs_references = True

    def __init__(self, model, size: int = 384):
        super().__init__()
        self.model, self.size = model, size

    def foreground(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H/4, W/4) in [0, 1]: max over queries of P(object) · σ(mask logit)."""
        x = F.interpolate((images.float() + 1) / 2, size=(self.size, self.size), mode="bilinear",
                          antialias=True, align_corners=False)
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        out = self.model(pixel_values=x)
        p_object = 1 - out.class_queries_logits.softmax(-1)[..., -1]  # the last class is "no object"
        return (p_object[..., None, None] * out.masks_queries_logits.sigmoid()).amax(1)

    def score(self, images, prompts, references=None) -> torch.Tensor:
        if references is None:
            raise ValueError("the structure reward compares with a reference image: pass references=")
        with torch.no_grad():
            target = self.foreground(references)
        return soft_iou(self.foreground(images), target)


def _mask2former(path=None, model=None) -> Mask2FormerStructure:
    from transformers import Mask2FormerForUniversalSegmentation
    from hypersd.metrics.real import _load
    return Mask2FormerStructure(_load("Mask2Former", Mask2FormerForUniversalSegmentation.from_pretrained,
                                      path or MASK2FORMER, use_safetensors=True))


register_reward("mini-structure", MiniStructure.load)
register_reward("mask2former", _mask2former)
