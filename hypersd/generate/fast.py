"""The fast path for few-step generation: a pipeline made ready once, then called many times.

At one step the UNet is a small part of a call. On the mini model at batch 1 (one CPU thread)
the plain path takes 57 ms: the text encoder 15, the UNet 14 and its LoRA adapter layers 14
more, the VAE decoder 6, Python and the scheduler the rest; the fast path takes 21 ms
(``hypersd bench speed`` measures both beside stock diffusers). It changes three things:
  fuse    the active LoRAs are merged into the weights once [W' = W + s·BA, LoRA, Hu et al.
          2021 §4.1] and their adapter layers removed, so a call runs plain layers;
  cache   prompt embeddings are kept per (prompt, negative prompt, CFG or not), least recently
          used dropped first; each distinct prompt is encoded once, alone (so its embedding is
          the same whatever batch it comes in): a demo that redraws one prompt at new seeds or
          steps encodes it once;
  speedup the UNet, VAE decoder and ControlNet run as traced graphs (``hypersd.generate.speedup``).
A call is otherwise the plain path's: the same recipe settings, seeds and diffusers pipeline,
so images equal ``run_pipeline``'s on the unfused pipeline within float tolerance
(tests/test_fast.py). The flow models' pipelines (SD3, FLUX, Qwen-Image) are fused and sped up
but encode their own prompts: their encoders' outputs (T5's padded window, Qwen-Image's
variable-length states with a mask) are no SD embedding to cache.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch

from hypersd.errors import UserError
from hypersd.generate.loading import _quiet_loading, model_family, prompt_arguments, recipe_settings
from hypersd.generate.recipes import SD_MODELS, Recipe
from hypersd.generate.speedup import SPEEDUPS

CACHE_SIZE = 256  # prompts kept: 48 KB each on the mini model, 0.24 MB on SD1.5 (twice under CFG)
SD_EMBEDS = ("prompt_embeds", "negative_prompt_embeds")
SDXL_EMBEDS = SD_EMBEDS + ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
SPED_UP = {"unet": ("forward", ()), "controlnet": ("forward", ()),
           "vae": ("decode", ("generator",))}  # component -> (method, keyword arguments it ignores)


def fuse_loras(pipe) -> None:
    """Merge the active LoRAs into the weights at their scales and remove their adapters; a
    pipeline without LoRAs is left as it is."""
    if not any(getattr(pipe, "get_list_adapters", dict)().values()):
        return
    with _quiet_loading():
        pipe.fuse_lora()  # [peft merges W + scaling·BA, scaling = weight·alpha/r as set_adapters set it]
        pipe.unload_lora_weights()


class PromptCache:
    """Prompt embeddings by (prompt, negative prompt, CFG), each prompt encoded once, alone."""

    def __init__(self, pipe, size: int = CACHE_SIZE):
        self.pipe, self.size = pipe, size
        self.sdxl = "prompt_2" in inspect.signature(pipe.encode_prompt).parameters
        self.names = SDXL_EMBEDS if self.sdxl else SD_EMBEDS
        self.rows: OrderedDict[tuple, tuple] = OrderedDict()

    @torch.no_grad()
    def embeddings(self, prompts: list[str], negative: str | None, cfg: bool) -> dict:
        """The pipeline-call arguments (``prompt_embeds`` and the rest) for ``prompts``."""
        keys = [(p, negative, cfg) for p in prompts]
        for key in dict.fromkeys(keys):
            if key not in self.rows:
                self.rows[key] = self._encode(*key)
        rows = [self.rows[k] for k in keys]
        for k in dict.fromkeys(keys):
            self.rows.move_to_end(k)
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        return {name: None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                for i, name in enumerate(self.names)}

    def _encode(self, prompt: str, negative: str | None, cfg: bool) -> tuple:
        """One prompt's embeddings, encoded alone: the same whatever else a batch holds."""
        negatives = [negative] if negative else None
        if self.sdxl:
            out = self.pipe.encode_prompt(prompt=[prompt], device=self.pipe.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=cfg, negative_prompt=negatives)
        else:
            out = self.pipe.encode_prompt([prompt], self.pipe.device, 1, cfg, negatives)
        return tuple(None if t is None else t[0] for t in out)


class FastPipeline:
    """A loaded pipeline made fast for repeated calls; pass it wherever ``run_pipeline`` takes a
    pipeline. ``fuse`` merges its LoRAs for good (the pipeline is the fast path's from then on);
    ``speedup`` is "trace", "compile" or "none" (``hypersd.generate.speedup``)."""

    def __init__(self, pipe, *, fuse: bool = True, speedup: str = "trace", cache_size: int = CACHE_SIZE):
        if speedup not in SPEEDUPS:
            raise UserError(f"unknown speedup {speedup!r}; use one of {', '.join(SPEEDUPS)}")
        if fuse:
            fuse_loras(pipe)
        self.pipe = _sped_up(pipe, speedup)
        self.cache = PromptCache(self.pipe, cache_size) if model_family(pipe) in SD_MODELS else None
        self.speedup = speedup

    @torch.no_grad()
    def __call__(self, prompts: list[str], recipe: Recipe, seeds: list[int], negative: str | None = None,
                 output_type: str = "pil", extra: dict | None = None):
        """The images of ``run_pipeline(pipe, prompts, recipe, seeds, negative, output_type, extra)``."""
        settings = recipe_settings(self.pipe, recipe, seeds, output_type)
        if self.cache is None:
            prompting = prompt_arguments(self.pipe, recipe, list(prompts), negative)
        else:
            prompting = self.cache.embeddings(list(prompts), negative, recipe.guidance > 1)
        return self.pipe(**prompting, **{**settings, **(extra or {})}).images


def _sped_up(pipe, speedup: str):
    """A twin of ``pipe`` (the same modules) whose UNet, VAE decoder and ControlNet run sped up."""
    if speedup == "none":
        return pipe
    twins = {name: SPEEDUPS[speedup](getattr(pipe, name), method, ignore)
             for name, (method, ignore) in SPED_UP.items()
             if isinstance(getattr(pipe, name, None), torch.nn.Module) and hasattr(getattr(pipe, name), method)}
    with _quiet_loading():  # from_pipe's advice on modules already in the pipeline's dtype
        twin = type(pipe).from_pipe(pipe, **twins)
    twin.set_progress_bar_config(disable=True)
    return twin
