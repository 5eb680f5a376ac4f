"""The mini world's two rewards, trained on emoji32's distill split.

**Adherence** (``mini-adherence``), its own small CLIP: an image tower (a plain conv net with GroupNorm) and the frozen MiniLM sentence embedding of
the caption with a learned projection, trained contrastively (symmetric InfoNCE over the
batch, CLIP's objective) with the emoji network's augmentation, so that it also scores
imperfect generations. Its reward is cos(image, caption). It shares no weights, data split
or training run with the evaluation network (``hypersd.metrics.classifier``): it never sees
the eval split, so the metrics stay a ruler the feedback step does not optimise.

**Structure** (``mini-structure``, in ``hypersd.rewards.structure``), the mini world's
instance segmentation: a small
encoder-decoder that predicts an emoji's foreground mask (the alpha channel of its source
image), trained with photometric augmentation. Its reward compares the masks it predicts
for a generated image and for a reference image, as a soft IoU in [0, 1].

    hypersd train-reward adherence     # writes hypersd/assets/rewards/mini-adherence
    hypersd train-reward structure     # writes hypersd/assets/rewards/mini-structure
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

from hypersd.io import atomic_path
from hypersd.rewards.base import Reward, register_reward

REWARDS_DIR = Path(__file__).resolve().parent.parent / "assets" / "rewards"
ADHERENCE_DIR = REWARDS_DIR / "mini-adherence"


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ImageTower(nn.Module):
    """32x32 RGB in [-1, 1] -> a unit vector (other sizes are resized to 32x32)."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(_conv(3, w, 1), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2),
                                  _conv(4 * w, 4 * w, 2), _conv(4 * w, 8 * w, 1))
        self.proj = nn.Linear(8 * w, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.proj(self.body(x).mean(dim=(2, 3))), dim=-1)


class SentenceEncoder:
    """MiniLM's sentence embedding (mean of the token states over the mask, unit length),
    cached per prompt."""

    def __init__(self):
        from hypersd.models.mini import load_text_encoder
        self.tokenizer, self.encoder = load_text_encoder()
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for i in range(0, len(new), 256):
            chunk = new[i:i + 256]
            ids = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            states = self.encoder(**ids).last_hidden_state
            mask = ids.attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
            self.cache.update(zip(chunk, pooled.float()))
        return torch.stack([self.cache[p] for p in prompts])


class AdherenceModel(nn.Module):
    def __init__(self, width: int = 32, dim: int = 128, text_dim: int = 384):
        super().__init__()
        self.image = ImageTower(width, dim)
        self.text = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def similarity(self, images: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """(N images, M sentence embeddings) -> (N, M) cosines."""
        return self.image(images) @ F.normalize(self.text(sentences), dim=-1).T


class MiniAdherence(Reward):
    """cos(image, caption) under the mini CLIP; about 0.5-0.9 for a matching emoji here."""

    def __init__(self, model: AdherenceModel):
        super().__init__()
        self.model, self.sentences = model, SentenceEncoder()

    def score(self, images, prompts, references=None) -> torch.Tensor:
        text = self.sentences(prompts).to(images.device)
        img = self.model.image(images.float())
        return (img * F.normalize(self.model.text(text), dim=-1)).sum(-1)

    @classmethod
    def load(cls, path: str | None = None, model: str | None = None) -> "MiniAdherence":
        build = lambda c: AdherenceModel(c["width"], c["dim"])  # noqa: E731
        return cls(_load(Path(path or ADHERENCE_DIR), build, "adherence"))


@dataclass
class RewardTraining:
    """The settings both mini rewards train with."""

    out_dir: str = str(ADHERENCE_DIR)
    steps: int = 800
    batch_size: int = 256
    lr: float = 2e-3
    width: int = 32
    seed: int = 0
    threads: int = 0


@dataclass
class AdherenceConfig(RewardTraining):
    dim: int = 128


def _split_tensors(split: str, masks: bool = False):
    """A split's images in [-1, 1] and captions (and foreground masks in [0, 1])."""
    from hypersd.data import load_emoji32
    from hypersd.imaging import to_signed_unit
    data = load_emoji32()
    idx = data.indices(split)
    out = (to_signed_unit(data.images[idx]), [data.captions[i] for i in idx])
    return (*out, torch.from_numpy(data.masks[idx]).float().div(255).unsqueeze(1)) if masks else out


def fit(model: nn.Module, cfg: RewardTraining, n: int, batch_loss, desc: str) -> nn.Module:
    """AdamW with a one-cycle schedule over ``cfg.steps`` random batches of ``n`` examples;
    ``batch_loss(idx, g)`` is the loss of the examples ``idx``. Returns the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc=desc)
    for _ in bar:
        loss = batch_loss(torch.randperm(n, generator=g)[:cfg.batch_size], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def train_adherence(cfg: AdherenceConfig) -> Path:
    """Contrastive training on the distill split; writes fp16 weights, config and retrieval
    accuracy (each split's images against that split's captions)."""
    from hypersd.metrics.classifier import augment
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, captions = _split_tensors("distill")
    sentences = SentenceEncoder()(captions)
    model = AdherenceModel(cfg.width, cfg.dim)

    def batch_loss(idx, g):
        logits = model.logit_scale.exp() * model.similarity(augment(images[idx], g), sentences[idx])
        labels = torch.arange(len(idx))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    fit(model, cfg, len(images), batch_loss, "adherence reward")
    accuracy = {split: retrieval_accuracy(model, *_split_tensors(split)) for split in ("distill", "eval")}
    return _save(model, cfg, {"retrieval_top1": accuracy})


@torch.no_grad()
def retrieval_accuracy(model: AdherenceModel, images: torch.Tensor, captions: list[str]) -> float:
    """How often an image's own caption is the most similar of its split's captions."""
    unique = list(dict.fromkeys(captions))
    sim = model.similarity(images, SentenceEncoder()(unique))
    truth = torch.tensor([unique.index(c) for c in captions])
    return float((sim.argmax(1) == truth).float().mean())


def _save(model: nn.Module, cfg, results: dict) -> Path:
    """fp16 weights and the training config with its results, written as one folder."""
    out = Path(cfg.out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
                  tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({**asdict(cfg), **results}, indent=1) + "\n")
    return out


def _load(path: Path, build, command: str) -> nn.Module:
    """A network saved by ``_save``: ``build(config)`` makes it, the weights fill it (fp32)."""
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no reward network at {path}: run `hypersd train-reward {command}`")
    model = build(json.loads((path / "config.json").read_text()))
    model.load_state_dict({k: v.float() for k, v in load_file(path / "model.safetensors").items()})
    return model


register_reward("mini-adherence", MiniAdherence.load)
