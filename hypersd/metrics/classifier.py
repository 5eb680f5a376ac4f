"""The mini world's image network: a small ResNet that names the emoji in a 32x32 image.

Its penultimate features drive the Fréchet distance (the mini world's FID) and diversity; its
top-1/top-5 predictions measure prompt adherence (the mini world's CLIP score). It is trained
with augmentation (shifts, blur, noise, colour jitter, VAE-like softening) so that it also
recognises imperfect generations. Each emoji32 style has its own network (a Twemoji
fine-tune is judged by one that knows Twemoji); the bundled teacher's is the noto one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hypersd.data import load_style
from hypersd.data.emoji32 import get_style, weights_notice
from hypersd.imaging import to_signed_unit
from hypersd.io import atomic_path

CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "emoji-classifier"


def classifier_dir(style: str = "noto") -> Path:
    """The bundled network of one emoji32 style: ``emoji-classifier`` (noto), else
    ``emoji-classifier-<style>``."""
    get_style(style)  # an unknown name: a UserError
    return CLASSIFIER_DIR if style == "noto" else CLASSIFIER_DIR.with_name(f"emoji-classifier-{style}")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class EmojiNet(nn.Module):
    """ResNet-style: 32x32 -> 16 -> 8 -> 4, global pooling to ``feature_dim`` features."""

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 256):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.body = nn.Sequential(_Block(w, 2 * w, 2), _Block(2 * w, 4 * w, 2),
                                  _Block(4 * w, 4 * w, 2))
        self.proj = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], (N, 3, 32, 32) -> (N, feature_dim)."""
        return F.relu(self.proj(self.body(self.stem(x)).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierConfig:
    data: str = "noto"               # the emoji32 style to learn
    out_dir: str = ""                # "" = the style's bundled folder (classifier_dir)
    epochs: int = 60
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    feature_dim: int = 256
    seed: int = 0
    threads: int = 0


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift (+-3 px), scale (0.85-1.1), blur, mild colour jitter and noise, on [-1, 1]."""
    n = len(x)
    scale = 0.85 + 0.25 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * (6 / 16)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = F.grid_sample(x - 1, grid, padding_mode="zeros", align_corners=False) + 1  # pads white
    blur = torch.rand(n, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None]) / 16
        soft = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        x = torch.where(blur[:, None, None, None], soft, x)
    # mild colour jitter: skin tones differ by colour alone, so the network must keep them apart
    gain = 1 + 0.06 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    bias = 0.06 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    noise = 0.05 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return (x * gain + bias + noise).clamp(-1, 1)


def _labels(style: str = "noto") -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Class names (unique captions), images in [-1, 1], and each image's class."""
    data = load_style(style)
    names = list(dict.fromkeys(data.captions))
    index = {c: i for i, c in enumerate(names)}
    images = to_signed_unit(data.images)
    return names, images, torch.tensor([index[c] for c in data.captions])


def train_classifier(cfg: ClassifierConfig) -> Path:
    """Train EmojiNet on all of one emoji32 style with augmentation; write its weights (fp16)
    and class names."""
    out = Path(cfg.out_dir or classifier_dir(cfg.data))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    names, images, labels = _labels(cfg.data)
    net = EmojiNet(len(names), cfg.width, cfg.feature_dim)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.epochs), desc="classifier")
    for _ in bar:
        perm = torch.randperm(len(images), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(net(augment(images[idx], g)), labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(half, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({**asdict(cfg), "out_dir": str(out), "classes": names},
                                                    indent=0) + "\n")
        if cfg.data != "noto":  # the committed noto network predates notices in weight folders
            (tmp / "NOTICE").write_text(weights_notice(cfg.data))
    return out


def load_classifier(path: str | Path = CLASSIFIER_DIR) -> tuple[EmojiNet, list[str]]:
    """The trained network (eval mode) and its class names."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no emoji classifier at {path}: run `hypersd train-classifier`")
    config = json.loads((path / "config.json").read_text())
    net = EmojiNet(len(config["classes"]), config["width"], config["feature_dim"])
    net.load_state_dict(load_file(path / "model.safetensors"))
    return net.eval().requires_grad_(False), config["classes"]
