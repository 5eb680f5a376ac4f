"""Training examples for distillation: prompts, their conditioning and, when there are images,
cached VAE latents.

Latent posteriors (mean, std) and the conditioning of every caption are computed once; a
batch draws indices with the run's generator, then (with caption dropout) which captions
become "", then z ~ N(mean, std²), which it scales. SD1.5-shaped pipelines condition on
``encoder_hidden_states``; SDXL-shaped ones also on the pooled text embedding and the
size/crop time ids. ``Prompts`` serves methods that train from prompts alone: its batches have
no latents. ``examples_for`` picks a run's examples by its ``data`` settings: emoji32 and
prompt files are encoded in memory here, image sources through the on-disk latent cache
(``hypersd.distill.cache``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypersd.distill.latents import LatentScale, posterior


@dataclass
class Batch:
    prompts: list[str]                 # the captions, as text
    cond: dict                         # UNet keyword inputs of the captions
    uncond: dict                       # the same for the empty prompt
    latents: torch.Tensor | None = None  # x₀ (scaled VAE latents); None for prompt-only data


def _sdxl_time_ids(pipe, n: int) -> torch.Tensor:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(n, 1)


@torch.no_grad()
def encode_text(pipe, prompts: list[str], batch: int = 256) -> dict:
    """The denoising network's keyword inputs for each prompt (tensors stacked along the batch)."""
    from hypersd.distill.family import family_of, prompt_cond
    fam = family_of(pipe)
    if fam.flow:
        parts = [prompt_cond(pipe, fam, prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
        return map_cond(lambda *v: torch.cat(v), *parts)
    sdxl = fam.name == "sdxl"
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out = pipe.encode_prompt(chunk, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        embeds.append(out[0])
        if sdxl:
            pooled.append(out[2])
    cond = {"encoder_hidden_states": torch.cat(embeds)}
    if sdxl:
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False) and prompts == [""]:
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            pooled = [torch.zeros_like(pooled[0])]
        cond["added_cond_kwargs"] = {"text_embeds": torch.cat(pooled),
                                     "time_ids": _sdxl_time_ids(pipe, len(prompts))}
    return cond


def map_cond(fn, *conds: dict) -> dict:
    """``fn`` applied to the matching tensors of one or more (nested) conditioning dicts:
    ``map_cond(lambda v: v[idx], cond)``, ``map_cond(lambda a, b: torch.cat([a, b]), u, c)``."""
    return {k: map_cond(fn, *(c[k] for c in conds)) if isinstance(v, dict) else fn(*(c[k] for c in conds))
            for k, v in conds[0].items()}


def draw_dropout(n: int, p: float, g: torch.Generator) -> torch.Tensor | None:
    """Which of ``n`` captions are dropped, each with chance ``p`` (None, and no draw, at 0)."""
    return torch.rand(n, generator=g) < p if p > 0 else None


def drop_captions(batch: Batch, drop: torch.Tensor | None) -> Batch:
    """``batch`` with the ``drop``ped captions made "" and their conditioning the empty
    prompt's (its time ids are the example's), so a student keeps the unconditional branch
    that classifier-free guidance needs [Ho & Salimans 2022, §3.2]."""
    if drop is None or not bool(drop.any()):
        return batch

    def pick(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.where(drop.to(c.device).view(-1, *[1] * (c.dim() - 1)), u.to(c), c)
    prompts = ["" if d else p for p, d in zip(batch.prompts, drop.tolist())]
    return Batch(prompts, map_cond(pick, batch.cond, batch.uncond), batch.uncond, batch.latents)


class Prompts:
    """Prompts alone (no images): batches carry conditioning and no latents."""

    has_images = False

    @torch.no_grad()
    def __init__(self, pipe, prompts: list[str], caption_dropout: float = 0.0):
        if not prompts:
            raise ValueError("no prompts to train on")
        self.prompts = list(prompts)
        self.caption_dropout = caption_dropout
        self.cond = encode_text(pipe, self.prompts)
        self.uncond = encode_text(pipe, [""])

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, g: torch.Generator) -> Batch:
        idx = torch.randint(len(self), (n,), generator=g)
        drop = draw_dropout(n, self.caption_dropout, g)
        batch = Batch([self.prompts[i] for i in idx], map_cond(lambda v: v[idx], self.cond),
                      map_cond(lambda v: v.expand(n, *v.shape[1:]), self.uncond), self._latents(idx, g))
        return drop_captions(batch, drop)

    def _latents(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
        return None


class LatentCaptions(Prompts):
    """Images (N, 3, H, W in [-1, 1]) and their captions, cached for training: a batch's
    latents are drawn from each image's VAE posterior, z ~ N(mean, std²), and normalised as the
    family's pipeline expects (``hypersd.distill.latents``)."""

    has_images = True

    @torch.no_grad()
    def __init__(self, pipe, images: torch.Tensor, captions: list[str], chunk: int = 256,
                 caption_dropout: float = 0.0):
        dists = [posterior(pipe.vae, images[i:i + chunk]) for i in range(0, len(images), chunk)]
        self.mean = torch.cat([m for m, _ in dists])
        self.std = torch.cat([s for _, s in dists])
        self.normalise = LatentScale.of(pipe.vae.config)  # scaled, shifted or per-channel (Qwen-Image)
        super().__init__(pipe, captions, caption_dropout)

    def _latents(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        z = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g)
        return self.normalise(z)


def emoji32_examples(pipe, split: str = "distill", caption_dropout: float = 0.0) -> LatentCaptions:
    """The emoji32 images and captions of a split, encoded with the pipeline's VAE/text encoder."""
    from hypersd.data import load_emoji32
    from hypersd.imaging import to_signed_unit
    data = load_emoji32()
    idx = data.indices(split)
    images = to_signed_unit(data.images[idx])
    from hypersd.distill.family import family_of
    size = family_of(pipe).resolution
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return LatentCaptions(pipe, images, [data.captions[i] for i in idx], caption_dropout=caption_dropout)


def examples_for(pipe, run, accelerator=None):
    """The training examples of ``run`` (a ``RunConfig``) by its ``data`` settings: emoji32's
    split, a prompt file's prompts, or an image source's cached latents (built first if need be,
    by the main process while the others wait)."""
    from hypersd.distill.sources import kind_of, read_prompts
    data = run.data
    kind = kind_of(data.source)
    if kind == "emoji32":
        return emoji32_examples(pipe, run.split, data.caption_dropout)
    if kind == "prompts":
        return Prompts(pipe, read_prompts(data.source), data.caption_dropout)
    from hypersd.distill.cache import cached_examples
    return cached_examples(pipe, data, accelerator)
