"""Mini-world quality metrics from the emoji network: FD, adherence and diversity, with CIs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hypersd.data import load_emoji32
from hypersd.imaging import to_signed_unit
from hypersd.metrics.classifier import CLASSIFIER_DIR, load_classifier
from hypersd.metrics.stats import bootstrap_ci, feature_fd, gaussian_stats, frechet_distance


def to_tensor(images) -> torch.Tensor:
    """PIL images or uint8 (N, H, W, 3) arrays -> float (N, 3, 32, 32) in [-1, 1]."""
    arr = np.stack([np.asarray(i.convert("RGB") if hasattr(i, "convert") else i) for i in images])
    x = to_signed_unit(arr)
    if x.shape[-1] != 32:
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="area")
    return x


@dataclass
class Scored:
    """Per-image network outputs of a set of generated images."""

    features: np.ndarray   # (N, D)
    rank: np.ndarray       # (N,) rank of the prompt's class among the logits (0 = top-1)


class MiniMetrics:
    """Scores images against the emoji32 dataset with the trained emoji network."""

    def __init__(self, path=CLASSIFIER_DIR, batch: int = 512, data=None):
        """``data``: the emoji32 set whose images FD compares against (default: the noto one)."""
        self.net, classes = load_classifier(path)
        self.index = {c: i for i, c in enumerate(classes)}
        self.batch = batch
        data = load_emoji32() if data is None else data
        self.aliases = _identical_classes(data, self.index)
        self.dataset_features = self.score(data.images, data.captions).features

    @torch.no_grad()
    def score(self, images, prompts: list[str]) -> Scored:
        unknown = [p for p in prompts if p not in self.index]
        if unknown:
            raise ValueError(f"prompts outside emoji32 cannot be scored, e.g. {unknown[0]!r}")
        x = to_tensor(images)
        feats, ranks = [], []
        target = torch.tensor([self.index[p] for p in prompts])
        for i in range(0, len(x), self.batch):
            f = self.net.features(x[i:i + self.batch])
            logits = self.net.head(f)
            for row, t in zip(logits, target[i:i + self.batch].tolist()):
                same = self.aliases.get(t, [t])
                # classes scoring above the target (or the best of its identical-image aliases)
                ranks.append(int((row > row[same].max()).sum()))
            feats.append(f)
        return Scored(torch.cat(feats).numpy(), np.array(ranks))

    def fd(self, features: np.ndarray, reference: np.ndarray | None = None) -> float:
        """Fréchet distance of features to a reference set (default: the whole dataset)."""
        return feature_fd(features, self.dataset_features if reference is None else reference)

    def report(self, scored: Scored, prompts: list[str], reference: np.ndarray | None = None,
               rounds: int = 200, seed: int = 0) -> dict[str, float]:
        """FD, top-1/top-5 adherence (%) and diversity, each with a 95% bootstrap interval
        (centred on the estimate for FD, percentile for the rest)."""
        n = len(prompts)
        ref = self.dataset_features if reference is None else reference
        ref_stats = gaussian_stats(ref)
        out = {}
        fd_of = lambda idx: frechet_distance(*gaussian_stats(scored.features[idx]), *ref_stats)  # noqa: E731
        out["fd"] = fd_of(np.arange(n))
        lo, hi = bootstrap_ci(fd_of, n, rounds, seed, centred=True)  # FD's resampling bias is upward
        out["fd_ci"] = (max(lo, 0.0), hi)
        for k in (1, 5):
            hits = (scored.rank < k).astype(np.float64) * 100
            out[f"top{k}"] = float(hits.mean())
            out[f"top{k}_ci"] = bootstrap_ci(lambda idx: hits[idx].mean(), n, rounds, seed)
        div = diversity_per_prompt(scored.features, prompts)
        if len(div):
            out["diversity"] = float(div.mean())
            out["diversity_ci"] = bootstrap_ci(lambda idx: div[idx].mean(), len(div), rounds, seed)
        return out


def _identical_classes(data, index: dict[str, int]) -> dict[int, list[int]]:
    """Classes whose dataset images are pixel-identical (e.g. the Norway, Svalbard and Bouvet
    Island flags): no picture can tell them apart, so adherence treats them as one."""
    by_image: dict[bytes, set[int]] = {}
    for img, caption in zip(data.images, data.captions):
        by_image.setdefault(img.tobytes(), set()).add(index[caption])
    aliases: dict[int, list[int]] = {}
    for group in by_image.values():
        if len(group) > 1:
            for c in group:
                aliases[c] = sorted(set(aliases.get(c, [c])) | group)
    return aliases


def diversity_per_prompt(features: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Mean pairwise feature distance among the images of each prompt (prompts with >= 2)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        f = torch.from_numpy(features[idx]).double()
        d = torch.cdist(f, f)
        out.append(float(d.sum() / (len(idx) * (len(idx) - 1))))
    return np.array(out)
