"""Inference recipes as data: scheduler, spacing, steps, eta, guidance and LoRA scale."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from hypersd.errors import UserError

RECIPES_FILE = Path(__file__).resolve().parent.parent / "recipes" / "inference.yaml"
SAMPLERS = ("ddim", "euler", "lcm", "tcd")
MAX_LORA_SCALE = 10.0  # beyond this a LoRA's ΔW swamps the weights it adds to: surely a typo


def check_lora_scale(scale: float, what: str) -> float:
    """``scale`` if it is a finite number within ±MAX_LORA_SCALE, else a UserError naming ``what``."""
    why = out_of_range(scale, -MAX_LORA_SCALE, MAX_LORA_SCALE)
    if why:
        raise UserError(f"{what}: LoRA scale {_show(scale)} is {why}: use a number from "
                        f"{-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (1 applies the LoRA as trained)")
    return float(scale)


def out_of_range(value, lo: float, hi: float) -> str | None:
    """Why ``value`` is not a finite number in [lo, hi] ("negative", "above 1", ...), or None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "not a number"
    if math.isinf(value):
        return "infinite"
    if value < lo:
        return "negative" if lo == 0 else f"below {lo:g}"
    if value > hi:
        return f"above {hi:g}"
    return None


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    sampler: str = "ddim"
    timestep_spacing: str | None = None      # None keeps the model's own scheduler setting
    steps: int = 25
    steps_range: tuple[int, int] = (1, 1000)
    timesteps: tuple[int, ...] | None = None  # explicit timesteps (lcm, tcd)
    eta: float | None = None                  # TCD gamma / DDIM eta; None = scheduler default
    guidance: float = 3.0
    lora_scale: float = 1.0
    negative: bool = False                    # negative prompts have an effect
    prediction_type: str | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise UserError(f"recipe {self.name!r}: unknown sampler {self.sampler!r}; "
                            f"use one of {', '.join(SAMPLERS)}")
        if self.timesteps is not None and self.sampler not in ("lcm", "tcd"):
            raise UserError(f"recipe {self.name!r}: explicit timesteps need the lcm or tcd sampler")
        lo, hi = self.steps_range
        n = len(self.timesteps) if self.timesteps else self.steps
        if not 1 <= lo <= hi:
            raise UserError(f"recipe {self.name!r}: steps_range {list(self.steps_range)} must be "
                            "two step counts, 1 or more, the smaller first")
        if not (isinstance(n, int) and lo <= n <= hi):
            raise UserError(f"{n} steps is outside the {lo}-{hi} that recipe {self.name!r} serves; "
                            "pass --steps in that range or choose another recipe")
        why = out_of_range(self.guidance, 0, math.inf)
        if why:
            raise UserError(f"guidance {_show(self.guidance)} is {why}: pass --guidance 0 or more, "
                            "e.g. 3 (1 or less turns classifier-free guidance off)")
        why = None if self.eta is None else out_of_range(self.eta, 0, 1)
        if why:
            raise UserError(f"eta {_show(self.eta)} is {why}: pass --eta from 0 (deterministic) to 1 "
                            "(TCD's gamma, DDIM's eta: how much fresh noise each step adds)")
        check_lora_scale(self.lora_scale, f"recipe {self.name!r}")

    def with_overrides(self, **changes) -> "Recipe":
        """A copy with the given fields replaced (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "steps" in changes and "timesteps" not in changes:
            changes["timesteps"] = None  # explicit timesteps fix the step count
        return dataclasses.replace(self, **changes)


def load_recipes(path: str | Path = RECIPES_FILE) -> dict[str, Recipe]:
    """All recipes of a YAML file, by name."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    fields = {f.name for f in dataclasses.fields(Recipe)}
    recipes = {}
    for name, spec in raw.items():
        unknown = set(spec) - fields
        if unknown:
            raise UserError(f"recipe {name!r} in {path}: unknown field(s) {sorted(unknown)}")
        for key in ("steps_range", "timesteps"):
            if spec.get(key) is not None:
                spec[key] = tuple(spec[key])
        recipes[name] = Recipe(name=name, **spec)
    return recipes


def get_recipe(name: str) -> Recipe:
    recipes = load_recipes()
    if name not in recipes:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(recipes)}")
    return recipes[name]
