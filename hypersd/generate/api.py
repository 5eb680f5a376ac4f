"""``generate``: prompts in, images out, with recipes, LoRAs and reproducible metadata."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from hypersd.errors import UserError, warn
from hypersd.files import write_folder
from hypersd.generate.autorecipe import choose_recipe
from hypersd.generate.controlnet import add_controlnets, check_controls
from hypersd.generate.grid import make_grid
from hypersd.generate.fast import FastPipeline
from hypersd.generate.flow import T5_TOKENIZER
from hypersd.generate.loading import (BUNDLED_FLOW, check_recipe_fits, load_pipeline, model_family,
                                      prompt_arguments, recipe_settings)
from hypersd.generate.prompt_loras import plan_loras
from hypersd.generate.recipes import ALL_SAMPLERS, Recipe, get_recipe

MAX_IMAGES = 4096  # images one call makes (prompts x batch); more is surely a typo
CHUNK = 16         # images per pipeline call: memory stays bounded however large the batch
MAX_SEED = 2**63 - 1
MAX_SIZE = 4096    # pixels a side; more is surely a typo
SIZE_STEP = 16     # sides are multiples of it: 8 (the VAE's scale) x 2 (FLUX's and Qwen-Image's patches)


@dataclass
class Generation:
    """What was generated: images (prompt-major: all seeds of prompt 0, then prompt 1, ...)."""

    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    recipe: Recipe
    model: str
    loras: list[tuple[str, float]] = field(default_factory=list)
    negative: str | None = None
    unet: str | None = None                 # a UNet that replaced the model's (full-network student)
    controlnets: list[dict] = field(default_factory=list)  # each ControlNet's model, image and scale
    lora_sets: list[list[tuple[str, float]]] | None = None  # each image's LoRAs, when prompts name some
    size: tuple[int, int] | None = None     # (width, height) asked for; None: the model's own

    def metadata(self, i: int) -> dict:
        loras = self.lora_sets[i] if self.lora_sets else self.loras
        return {"prompt": self.prompts[i], "seed": self.seeds[i], "negative": self.negative,
                "model": self.model, "unet": self.unet, "loras": loras, "recipe": asdict(self.recipe),
                **({"controlnets": self.controlnets} if self.controlnets else {}),
                **({"size": list(self.size)} if self.size else {})}

    def save(self, out_dir: str | Path, grid_cell: int = 128) -> list[Path]:
        """Write one PNG per image (metadata in text chunks) and ``grid.png``, all or none of
        them (a full disk leaves no partial files); return the paths, the grid last."""
        writers = {f"{i:04d}-seed{seed}.png": self._png_writer(i) for i, seed in enumerate(self.seeds)}
        unique = list(dict.fromkeys(self.prompts))
        per = len(self.images) // len(unique)
        rows = [self.images[r * per:(r + 1) * per] for r in range(len(unique))]
        grid = make_grid(rows, unique, [f"seed {s}" for s in self.seeds[:per]], cell=grid_cell)
        writers["grid.png"] = lambda path: grid.save(path, format="PNG")
        return write_folder(out_dir, writers)

    def _png_writer(self, i: int):
        info = PngInfo()
        for key, value in self.metadata(i).items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        return lambda path: self.images[i].save(path, format="PNG", pnginfo=info)


def resolve_recipe(recipe: str | Recipe | None = None, *, steps=None, sampler=None, eta=None,
                   guidance=None, timesteps=None, distilled_guidance=None) -> Recipe:
    """The named recipe (default: "teacher") with the caller's explicit settings on top."""
    base = recipe if isinstance(recipe, Recipe) else get_recipe(recipe or "teacher")
    if sampler is not None and sampler not in ALL_SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(ALL_SAMPLERS)}")
    # Recipe checks every field (steps in the recipe's range, guidance, eta, LoRA scale)
    return base.with_overrides(steps=steps, sampler=sampler, eta=eta, guidance=guidance,
                               timesteps=tuple(timesteps) if timesteps else None,
                               distilled_guidance=distilled_guidance)


def default_recipe(model: str | None) -> str:
    """The recipe a model is run with when neither the caller nor a file names one: the bundled
    flow model's own (``mini-flow``), else the teacher's."""
    return BUNDLED_FLOW if model == BUNDLED_FLOW else "teacher"


def _check_request(prompts: list[str], batch: int, seed: int) -> list[str]:
    """Prompts, images per prompt and the first seed, refused before any work."""
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("empty prompt: give at least one non-empty prompt")
    if not isinstance(batch, int) or batch < 1:
        raise UserError(f"--batch {batch}: give at least 1 image per prompt")
    if len(prompts) * batch > MAX_IMAGES:
        raise UserError(f"{len(prompts)} prompt(s) x --batch {batch} = {len(prompts) * batch} images, "
                        f"more than the {MAX_IMAGES} one call makes: lower --batch to at most "
                        f"{MAX_IMAGES // len(prompts)} and run again with another --seed for more")
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - batch:
        raise UserError(f"--seed {seed}: use a whole number from 0 to {MAX_SEED - batch}")
    return prompts


def _check_size(width: int | None, height: int | None) -> tuple[int, int] | None:
    """(width, height) asked for, both or neither, each a multiple of SIZE_STEP up to MAX_SIZE."""
    if width is None and height is None:
        return None
    for name, side in (("--width", width), ("--height", height)):
        if type(side) is not int or not SIZE_STEP <= side <= MAX_SIZE or side % SIZE_STEP:
            raise UserError(f"{name} {side}: give both --width and --height, each a multiple of {SIZE_STEP} "
                            f"from {SIZE_STEP} to {MAX_SIZE} pixels (e.g. 1024)")
    return width, height


def warn_truncated(pipe, prompts: list[str], recipe: Recipe | None = None) -> None:
    """One warning line per prompt longer than the text encoder's window, naming what is cut."""
    window = _text_window(pipe, recipe)
    if window is None:
        return
    tokenizer, tokens = window
    room = tokens - len(tokenizer("").input_ids)  # less [CLS]/[SEP], BOS/EOS or T5's </s>
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) > room:
            warn(f"prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is longer than the text "
                 f"encoder's {tokens} tokens; dropped: {tokenizer.decode(ids[room:])!r}")


def _text_window(pipe, recipe: Recipe | None):
    """(tokenizer, tokens) of the text encoder whose window cuts a prompt: SD's CLIP (SDXL's
    narrower one); SD3's and FLUX's T5 at max_sequence_length (what CLIP cuts, T5 still reads);
    None for Qwen-Image, whose 1024 tokens no prompt reaches."""
    family = model_family(pipe)
    t5 = getattr(pipe, T5_TOKENIZER.get(family, ""), None)
    if t5 is not None:
        default = inspect.signature(pipe.__call__).parameters["max_sequence_length"].default
        return t5, (recipe and recipe.max_sequence_length) or default
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]
    if family == "qwen-image" or not tokenizers:
        return None
    tokenizer = min(tokenizers, key=lambda t: t.model_max_length)
    return tokenizer, tokenizer.model_max_length


@torch.no_grad()
def run_pipeline(pipe, prompts: list[str], recipe: Recipe, seeds: list[int],
                 negative: str | None = None, output_type: str = "pil", extra: dict | None = None):
    """One call of the diffusers pipeline with the recipe's settings; one seed per image.
    ``extra`` holds more call arguments (ControlNets' images and scales). ``pipe`` may be a
    ``FastPipeline`` (hypersd.generate.fast), which draws the same images faster."""
    if isinstance(pipe, FastPipeline):
        return pipe(prompts, recipe, seeds, negative, output_type, extra)
    kwargs = recipe_settings(pipe, recipe, seeds, output_type)
    return pipe(**prompt_arguments(pipe, recipe, prompts, negative), **{**kwargs, **(extra or {})}).images


def generate(prompts: list[str], *, model: str | None = None, loras: list[str] = (),
             recipe: str | Recipe | None = None, steps: int | None = None,
             sampler: str | None = None, eta: float | None = None, guidance: float | None = None,
             negative: str | None = None, seed: int = 0, batch: int = 1, pipe=None,
             config: str | None = None, unet: str | None = None, chunk: int = CHUNK,
             controlnets=(), lora_dir: str | None = None, distilled_guidance: float | None = None,
             width: int | None = None, height: int | None = None) -> Generation:
    """Generate ``batch`` images per prompt; seeds are ``seed, seed+1, ...`` for each prompt.
    At most ``MAX_IMAGES`` in all, made ``chunk`` images a pipeline call.

    ``loras`` are "PATH" or "PATH:SCALE" strings; without a scale the recipe's is used. A
    prompt may name its own, ``<lora:NAME:WEIGHT>`` (hypersd.generate.prompt_loras; NAME in
    ``lora_dir``, default ``$HYPERSD_LORA_DIR``). Without ``recipe``, the first LoRA or
    ``unet`` that says how it is run picks it (hypersd.generate.autorecipe), in one line on
    stderr; else "teacher". ``unet`` (a UNet folder or .safetensors file) replaces the
    model's UNet, e.g. with a one-step full-network student. ``controlnets`` are
    ``(model, image, scale)`` tuples or ``Control``s (hypersd.generate.controlnet): a
    ControlNet folder or hub id, a control image
    (a path or a PIL image, resized to the model's resolution, used for every image) and a
    conditioning scale from 0 to 2 (default 1). Pass an already loaded ``pipe`` to skip loading.
    ``distilled_guidance`` sets a guidance-distilled transformer's guidance (FLUX.1-dev's
    ``guidance_scale``; ``guidance`` is classifier-free guidance on every model). ``width`` and
    ``height`` (both or neither) replace the model's default size.
    Without LoRA tags in the prompts the call runs the fast path (hypersd.generate.fast): each
    distinct prompt encoded once, and the LoRAs fused into the weights of a pipeline it loaded.
    """
    prompts = _check_request(list(prompts), batch, seed)
    size = _check_size(width, height)
    plan = plan_loras(prompts, loras, lora_dir)  # before the model loads: a bad file or tag fails fast
    choice = choose_recipe(recipe, steps, [unet, *plan.files], default_recipe(model))
    with choice.explaining():  # a recipe picked for the user that refuses their settings says why
        r = resolve_recipe(choice.recipe, steps=choice.steps, sampler=sampler, eta=eta, guidance=guidance,
                           distilled_guidance=distilled_guidance)
        if negative and r.guidance <= 1:
            raise UserError(f"a negative prompt needs classifier-free guidance, and recipe {r.name!r} "
                            f"runs at guidance {r.guidance:g}: pass --guidance above 1 or use a "
                            "recipe that keeps CFG (teacher, hyper-sd-cfg)")
    parsed = [(p, r.lora_scale if s is None else s) for p, s in plan.shared]
    controls = check_controls(controlnets)  # scales, configs and images, before the model
    owned = pipe is None
    if owned:
        pipe = load_pipeline(model, config=config, unet=unet)
    with choice.explaining():
        check_recipe_fits(pipe, r)  # before its LoRAs load: a recipe for another model says which fit
    if owned or plan.any_tags:  # a given pipe holds its LoRAs already, unless prompts name some
        plan.load(pipe, r.lora_scale)
    choice.say(r)
    pipe, control_args = add_controlnets(pipe, controls)
    if size:
        control_args = {**control_args, "width": size[0], "height": size[1]}
    warn_truncated(pipe, plan.texts, r)
    if not plan.any_tags:  # one set of LoRAs: fused into a pipeline of our own, prompts encoded once
        pipe = FastPipeline(pipe, fuse=owned, speedup="none")
    all_prompts = [p for p in prompts for _ in range(batch)]
    seeds = [seed + k for _ in prompts for k in range(batch)]
    images = [None] * len(all_prompts)
    for group in plan.passes(pipe, batch, r.lora_scale):  # one pass per set of LoRAs the prompts name
        made = run_in_chunks(pipe, [plan.texts[i // batch] for i in group], r, [seeds[i] for i in group],
                             negative, chunk, control_args)
        for i, image in zip(group, made):
            images[i] = image
    lora_sets = [s for s in plan.sets(r.lora_scale) for _ in range(batch)] if plan.any_tags else None
    return Generation(images, all_prompts, seeds, r, model or "mini", parsed, negative, unet,
                      [c.control.record() for c in controls], lora_sets, size)


def run_in_chunks(pipe, prompts: list[str], recipe: Recipe, seeds: list[int],
                  negative: str | None = None, chunk: int = CHUNK,
                  extra: dict | None = None) -> list[Image.Image]:
    """``run_pipeline`` over at most ``chunk`` images a call, with a progress bar when there is
    more than one call; each image has its own seed, so the images are those of one call."""
    images = []
    with tqdm(total=len(prompts), unit="image", desc="generating", disable=len(prompts) <= chunk) as bar:
        for start in range(0, len(prompts), chunk):
            images += run_pipeline(pipe, prompts[start:start + chunk], recipe, seeds[start:start + chunk],
                                   negative, extra=extra)
            bar.update(len(prompts[start:start + chunk]))
    return images
