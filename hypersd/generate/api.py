"""``generate``: prompts in, images out, with recipes, LoRAs and reproducible metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from hypersd.errors import UserError
from hypersd.generate.grid import make_grid
from hypersd.generate.loading import configure_scheduler, load_loras, load_pipeline, parse_lora
from hypersd.generate.recipes import SAMPLERS, Recipe, get_recipe


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

    def metadata(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "seed": self.seeds[i], "negative": self.negative,
                "model": self.model, "unet": self.unet, "loras": self.loras, "recipe": asdict(self.recipe)}

    def save(self, out_dir: str | Path, grid_cell: int = 128) -> list[Path]:
        """Write one PNG per image (metadata in text chunks) and ``grid.png``; return the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(self.images):
            info = PngInfo()
            for key, value in self.metadata(i).items():
                info.add_text(key, value if isinstance(value, str) else json.dumps(value))
            path = out_dir / f"{i:04d}-seed{self.seeds[i]}.png"
            img.save(path, pnginfo=info)
            paths.append(path)
        unique = list(dict.fromkeys(self.prompts))
        per = len(self.images) // len(unique)
        rows = [self.images[r * per:(r + 1) * per] for r in range(len(unique))]
        make_grid(rows, unique, [f"seed {s}" for s in self.seeds[:per]], cell=grid_cell).save(out_dir / "grid.png")
        return paths + [out_dir / "grid.png"]


def resolve_recipe(recipe: str | Recipe | None = None, *, steps=None, sampler=None, eta=None,
                   guidance=None, timesteps=None) -> Recipe:
    """The named recipe (default: "teacher") with the caller's explicit settings on top."""
    base = recipe if isinstance(recipe, Recipe) else get_recipe(recipe or "teacher")
    if sampler is not None and sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    r = base.with_overrides(steps=steps, sampler=sampler, eta=eta, guidance=guidance,
                            timesteps=tuple(timesteps) if timesteps else None)
    lo, hi = r.steps_range
    n = len(r.timesteps) if r.timesteps else r.steps
    if not lo <= n <= hi:
        raise UserError(f"{n} steps is outside the {lo}-{hi} that recipe {r.name!r} serves; "
                        "pass --steps in that range or choose another recipe")
    return r


def _check_prompts(prompts: list[str]) -> list[str]:
    if not prompts or any(not p.strip() for p in prompts):
        raise UserError("empty prompt: give at least one non-empty prompt")
    return prompts


@torch.no_grad()
def run_pipeline(pipe, prompts: list[str], recipe: Recipe, seeds: list[int],
                 negative: str | None = None, output_type: str = "pil"):
    """One call of the diffusers pipeline with the recipe's settings; one seed per image."""
    if recipe.steps > pipe.scheduler.config.num_train_timesteps:
        raise UserError(f"steps must be at most {pipe.scheduler.config.num_train_timesteps}")
    if recipe.steps < 1:
        raise UserError("steps must be at least 1")
    configure_scheduler(pipe, recipe.sampler, recipe.timestep_spacing, recipe.prediction_type)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kwargs = dict(guidance_scale=recipe.guidance, generator=generators, output_type=output_type)
    if recipe.timesteps:
        kwargs["timesteps"] = list(recipe.timesteps)
    else:
        kwargs["num_inference_steps"] = recipe.steps
    if recipe.eta is not None:
        kwargs["eta"] = recipe.eta
    if negative:
        kwargs["negative_prompt"] = [negative] * len(prompts)
    return pipe(prompt=prompts, **kwargs).images


def generate(prompts: list[str], *, model: str | None = None, loras: list[str] = (),
             recipe: str | Recipe | None = None, steps: int | None = None,
             sampler: str | None = None, eta: float | None = None, guidance: float | None = None,
             negative: str | None = None, seed: int = 0, batch: int = 1, pipe=None,
             config: str | None = None, unet: str | None = None) -> Generation:
    """Generate ``batch`` images per prompt; seeds are ``seed, seed+1, ...`` for each prompt.

    ``loras`` are "PATH" or "PATH:SCALE" strings; without a scale the recipe's is used.
    ``unet`` (a UNet folder or .safetensors file) replaces the model's UNet, e.g. with a
    one-step full-network student. Pass an already loaded ``pipe`` to skip loading.
    """
    prompts = _check_prompts(list(prompts))
    if batch < 1:
        raise UserError("--batch must be at least 1")
    r = resolve_recipe(recipe, steps=steps, sampler=sampler, eta=eta, guidance=guidance)
    if negative and r.guidance <= 1:
        raise UserError(f"a negative prompt needs classifier-free guidance, and recipe {r.name!r} "
                        f"runs at guidance {r.guidance:g}: pass --guidance above 1 or use a "
                        "recipe that keeps CFG (teacher, hyper-sd-cfg)")
    parsed = [(p, r.lora_scale if s is None else s) for p, s in map(parse_lora, loras)]
    if pipe is None:
        pipe = load_pipeline(model, config=config, unet=unet)
        load_loras(pipe, parsed)
    all_prompts = [p for p in prompts for _ in range(batch)]
    seeds = [seed + k for _ in prompts for k in range(batch)]
    images = run_pipeline(pipe, all_prompts, r, seeds, negative)
    return Generation(images, all_prompts, seeds, r, model or "mini", parsed, negative, unet)
