"""Inference recipes as data: scheduler, spacing or flow shift, steps, eta, guidance and LoRA
scale, and the model families each recipe is for."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from hypersd.errors import UserError

RECIPES_FILE = Path(__file__).resolve().parent.parent / "recipes" / "inference.yaml"
SAMPLERS = ("ddim", "euler", "lcm", "tcd")     # SD1.5/SDXL: diffusers' schedulers of ε/v-prediction
FLOW_SAMPLERS = ("flow_euler",)  # flow matching: x_{σ'} = x_σ + (σ' − σ)·v [Lipman et al. 2023; SD3 §2]
ALL_SAMPLERS = SAMPLERS + FLOW_SAMPLERS
# Model families, as a loaded pipeline tells them apart (hypersd.generate.loading.model_family)
MODELS = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX", "qwen-image": "Qwen-Image"}
SD_MODELS = ("sd15", "sdxl")                   # ε/v-prediction UNets: ddim, euler, lcm, tcd
FLOW_MODELS = ("sd3", "flux", "qwen-image")    # flow-matching transformers: flow_euler
TIME_SHIFTS = ("exponential", "linear")        # FlowMatchEulerDiscreteScheduler's time_shift_type
MAX_TEXT_TOKENS = 1024                         # Qwen-Image's window; T5's (SD3, FLUX) is 512
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
    models: tuple[str, ...] = SD_MODELS       # the model families (MODELS) the recipe is for
    # flow_euler only: FlowMatchEulerDiscreteScheduler's settings, None keeping the model's own
    shift: float | None = None                # static shift s: σ ← sσ / (1 + (s−1)σ) [SD3 §5.3.2]
    use_dynamic_shifting: bool | None = None  # shift by the image's token count n instead:
    base_shift: float | None = None           #   μ = base_shift at n = base_image_seq_len, linear in n
    max_shift: float | None = None            #   up to max_shift at max_image_seq_len [FLUX's scheduler]
    base_image_seq_len: int | None = None
    max_image_seq_len: int | None = None
    time_shift_type: str | None = None        # "exponential": σ ← e^μ / (e^μ + 1/σ − 1); "linear"
    shift_terminal: float | None = None       # the last σ the schedule is stretched to; 0 turns it off
    distilled_guidance: float | None = None   # a guidance embedding's input (FLUX.1-dev's guidance_scale)
    max_sequence_length: int | None = None    # text tokens (T5, Qwen2.5-VL); None: the pipeline's default

    def __post_init__(self):
        if self.sampler not in ALL_SAMPLERS:
            raise UserError(f"recipe {self.name!r}: unknown sampler {self.sampler!r}; "
                            f"use one of {', '.join(ALL_SAMPLERS)}")
        self._check_models()
        if self.sampler in FLOW_SAMPLERS:
            self._check_flow()
        else:
            self._check_no_flow_fields()
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

    @property
    def flow(self) -> bool:
        """Whether the recipe runs a flow-matching model (SD3, FLUX, Qwen-Image)."""
        return self.sampler in FLOW_SAMPLERS

    def models_named(self) -> str:
        """The recipe's model families as people write them: "SD1.5/SDXL", "FLUX"."""
        return "/".join(MODELS[m] for m in self.models)

    def _check_models(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if not self.models or unknown:
            raise UserError(f"recipe {self.name!r}: models {list(self.models)} must name model families "
                            f"from {', '.join(MODELS)}")
        kind = FLOW_MODELS if self.flow else SD_MODELS
        wrong = [m for m in self.models if m not in kind]
        if wrong:
            fits = "flow_euler" if not self.flow else "ddim, euler, lcm or tcd"
            raise UserError(f"recipe {self.name!r}: sampler {self.sampler} does not run {MODELS[wrong[0]]} "
                            f"models (the recipe's models: {self.models_named()}): use {fits}")

    def _check_no_flow_fields(self) -> None:
        given = [f for f in FLOW_FIELDS if getattr(self, f) is not None]
        if given:
            raise UserError(f"recipe {self.name!r}: {', '.join(given)} set the flow_euler sampler of SD3, "
                            f"FLUX and Qwen-Image models, not {self.sampler}: remove them or use flow_euler")

    def _check_flow(self) -> None:
        """The flow sampler's settings: no SD-only field, each shift setting in its range."""
        given = [f for f in SD_ONLY_FIELDS if getattr(self, f) is not None]
        if given:
            raise UserError(f"recipe {self.name!r}: {', '.join(given)} set SD1.5/SDXL samplers, not "
                            "flow_euler (flow models are shifted instead: shift, use_dynamic_shifting)")
        for name, lo, hi, hint in FLOW_NUMBERS:
            value = getattr(self, name)
            why = None if value is None else out_of_range(value, lo, hi)
            if why:
                raise UserError(f"recipe {self.name!r}: {name} {_show(value)} is {why}: {hint}")
        for name, most in FLOW_COUNTS.items():
            value = getattr(self, name)
            if value is not None and not (type(value) is int and 1 <= value <= most):
                raise UserError(f"recipe {self.name!r}: {name} {_show(value)} must be a whole number of "
                                f"tokens from 1 to {most}")
        for name, choices in FLOW_CHOICES.items():
            if getattr(self, name) not in (None, *choices):
                raise UserError(f"recipe {self.name!r}: {name} {getattr(self, name)!r} must be one of "
                                f"{', '.join(map(str, choices))}")
        if (self.base_image_seq_len or 0) >= (self.max_image_seq_len or math.inf):
            raise UserError(f"recipe {self.name!r}: base_image_seq_len {self.base_image_seq_len} must be "
                            f"below max_image_seq_len {self.max_image_seq_len}")

    def scheduler_config(self) -> dict:
        """The flow scheduler's config entries the recipe sets (shift_terminal 0: None, no stretch)."""
        config = {f: getattr(self, f) for f in SCHEDULER_FIELDS if getattr(self, f) is not None}
        if config.get("shift_terminal") == 0:
            config["shift_terminal"] = None
        return config

    def with_overrides(self, **changes) -> "Recipe":
        """A copy with the given fields replaced (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "steps" in changes and "timesteps" not in changes:
            changes["timesteps"] = None  # explicit timesteps fix the step count
        return dataclasses.replace(self, **changes)


# FlowMatchEulerDiscreteScheduler's config entries a recipe may set, under their diffusers names
SCHEDULER_FIELDS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                    "max_image_seq_len", "time_shift_type", "shift_terminal")
FLOW_FIELDS = SCHEDULER_FIELDS + ("distilled_guidance", "max_sequence_length")
SD_ONLY_FIELDS = ("timestep_spacing", "timesteps", "eta", "prediction_type")
FLOW_NUMBERS = (  # (field, lowest, highest, what to write instead)
    ("shift", 0.01, 100, "use a number from 0.01, e.g. 3 (SD3's; 1 leaves the schedule as it is)"),
    ("base_shift", -10, 10, "use a μ from -10 to 10, e.g. 0.5 (FLUX.1's, with max_shift 1.15)"),
    ("max_shift", -10, 10, "use a μ from -10 to 10, e.g. 1.15 (FLUX.1's, with base_shift 0.5)"),
    ("shift_terminal", 0, 0.999, "use a σ from 0 (no stretch) to below 1"),
    ("distilled_guidance", 0, 100, "use a number from 0 to 100, e.g. 3.5 (FLUX.1-dev's card)"),
)
FLOW_COUNTS = {"base_image_seq_len": 2**20, "max_image_seq_len": 2**20, "max_sequence_length": MAX_TEXT_TOKENS}
FLOW_CHOICES = {"use_dynamic_shifting": (True, False), "time_shift_type": TIME_SHIFTS}


def load_recipes(path: str | Path = RECIPES_FILE) -> dict[str, Recipe]:
    """All recipes of a YAML file, by name."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    fields = {f.name for f in dataclasses.fields(Recipe)}
    recipes = {}
    for name, spec in raw.items():
        unknown = set(spec) - fields
        if unknown:
            raise UserError(f"recipe {name!r} in {path}: unknown field(s) {sorted(unknown)}")
        if isinstance(spec.get("models"), str):
            spec["models"] = [spec["models"]]  # "models: flux" names one family
        for key in ("steps_range", "timesteps", "models"):
            if spec.get(key) is not None:
                spec[key] = tuple(spec[key])
        recipes[name] = Recipe(name=name, **spec)
    return recipes


def recipes_for(family: str) -> list[str]:
    """The names of the recipes written for a model family ("flux", "sd15", ...)."""
    return [name for name, r in load_recipes().items() if family in r.models]


def get_recipe(name: str) -> Recipe:
    recipes = load_recipes()
    if name not in recipes:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(recipes)}")
    return recipes[name]
