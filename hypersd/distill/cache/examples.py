"""A cache entry as training examples: ``sample(n, g)`` like ``hypersd.distill.data.Prompts``."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from hypersd.distill.cache import shards
from hypersd.distill.data import Batch, draw_dropout, drop_captions, map_cond
from hypersd.distill.latents import LatentScale


class CachedExamples:
    """Images' latent posteriors and their captions' conditioning, read from a cache entry.

    A draw is the same function of the generator as ``LatentCaptions``': indices, then the
    dropped captions, then z ~ N(mean, std²), normalised as ``hypersd.distill.latents`` says
    (scaled; shifted for SD3's and FLUX's VAEs; per channel for Qwen-Image's).
    """

    has_images = True

    def __init__(self, folder: Path, vae_config, caption_dropout: float = 0.0, device="cpu"):
        self.shards = shards.Shards(folder)
        self.normalise = LatentScale.of(vae_config)
        self.uncond = shards.unflatten(load_file(str(folder / shards.UNCOND)))
        self.caption_dropout, self.device = caption_dropout, torch.device(device)

    def __len__(self) -> int:
        return len(self.shards)

    def sample(self, n: int, g: torch.Generator) -> Batch:
        return to_device(self.draw(n, g), self.device)

    def draw(self, n: int, g: torch.Generator) -> Batch:
        """A batch on the CPU (what a prefetching worker makes)."""
        idx = torch.randint(len(self), (n,), generator=g)
        drop = draw_dropout(n, self.caption_dropout, g)
        rows, captions = self.shards.rows(idx)
        z = rows["mean"] + rows["std"] * torch.randn(rows["mean"].shape, generator=g)
        cond = shards.unflatten(rows)
        uncond = map_cond(lambda v: v.expand(n, *v.shape[1:]), self.uncond)
        if "time_ids" in rows:  # SDXL: both branches see the image's own size and crop
            cond["added_cond_kwargs"]["time_ids"] = rows["time_ids"]
            uncond["added_cond_kwargs"]["time_ids"] = rows["time_ids"]
        return drop_captions(Batch(captions, cond, uncond, self.normalise(z)), drop)


def to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    move = lambda v: v.to(device)
    return Batch(batch.prompts, map_cond(move, batch.cond), map_cond(move, batch.uncond),
                 None if batch.latents is None else move(batch.latents))
