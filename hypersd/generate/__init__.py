"""Few-step generation: any base model, any acceleration LoRA, recipes shipped as data."""

from hypersd.generate.api import Generation, generate, resolve_recipe, run_pipeline
from hypersd.generate.controlnet import Control
from hypersd.generate.loading import configure_scheduler, load_loras, load_pipeline
from hypersd.generate.recipes import Recipe, get_recipe, load_recipes

__all__ = ["Control", "Generation", "Recipe", "configure_scheduler", "generate", "get_recipe",
           "load_loras", "load_pipeline", "load_recipes", "resolve_recipe", "run_pipeline"]
