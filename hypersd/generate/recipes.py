"""Inference recipes as data: scheduler, spacing, steps, eta, guidance and LoRA scale."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from hypersd.errors import UserError

RECIPES_FILE = Path(__file__).resolve().parent.parent / "recipes" / "inference.yaml"
SAMPLERS = ("ddim", "euler", "lcm", "tcd")


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
