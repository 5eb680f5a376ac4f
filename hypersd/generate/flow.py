"""Flow-matching pipelines (SD3, FLUX, Qwen-Image) run from a recipe: the call arguments that
set their guidance and text window, and the negative prompt their true CFG runs with.

Two kinds of guidance meet here, and each pipeline takes them under its own names:
  classifier-free  two passes, v̂ = v_u + w·(v_c − v_u) [Ho & Salimans 2022]: SD3's
                   ``guidance_scale``, FLUX's and Qwen-Image's ``true_cfg_scale`` (which runs
                   only with a negative prompt); the recipe's ``guidance``, off at 1 or less;
  distilled        one pass, w fed to the transformer's guidance embedding (FLUX.1-dev, whose
                   transformer has ``guidance_embeds``, was distilled from CFG so [FLUX.1-dev's
                   card]): FLUX's ``guidance_scale``; the recipe's ``distilled_guidance``.
"""

from __future__ import annotations

from hypersd.errors import UserError

TRUE_CFG = ("flux", "qwen-image")   # families whose CFG is true_cfg_scale with a negative prompt
# The negative prompt their CFG runs with when the user gives none: SD's unconditional prompt is
# "" too; Qwen-Image's card passes " " ("an empty string if you do not have specific concept to remove")
EMPTY_NEGATIVE = {"flux": "", "qwen-image": " "}
TEXT_WINDOW = {"sd3": 512, "flux": 512, "qwen-image": 1024}  # the max_sequence_length each accepts
T5_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}  # the widest text window of SD3 and FLUX


def guidance_arguments(pipe, family: str, recipe) -> dict:
    """The guidance (and text window) arguments of a pipeline call, as ``family`` names them."""
    kwargs = {"true_cfg_scale" if family in TRUE_CFG else "guidance_scale": recipe.guidance}
    if recipe.flow:
        kwargs.update(_distilled(pipe, recipe))
    if recipe.max_sequence_length is not None:
        if recipe.max_sequence_length > TEXT_WINDOW[family]:
            raise UserError(f"recipe {recipe.name!r}: max_sequence_length {recipe.max_sequence_length} is "
                            f"above the {TEXT_WINDOW[family]} text tokens this model takes: use at most that")
        kwargs["max_sequence_length"] = recipe.max_sequence_length
    elif (window := short_window(pipe, family)) is not None:
        kwargs["max_sequence_length"] = window
    return kwargs


def short_window(pipe, family: str) -> int | None:
    """The T5-role tokenizer's own length when it is shorter than the pipeline's default window
    (the mini flow model's MiniLM: 32 tokens, what it was trained with); None otherwise."""
    import inspect
    tokenizer = getattr(pipe, T5_TOKENIZER.get(family, ""), None)
    if tokenizer is None:
        return None
    default = inspect.signature(pipe.__call__).parameters["max_sequence_length"].default
    return tokenizer.model_max_length if tokenizer.model_max_length < default else None


def _distilled(pipe, recipe) -> dict:
    """FLUX's ``guidance_scale``: a value for a transformer with a guidance embedding, none without."""
    embeds = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
    if embeds and recipe.distilled_guidance is None:
        raise UserError(f"this model's transformer takes distilled guidance (as FLUX.1-dev's does) and recipe "
                        f"{recipe.name!r} sets none: pass --distilled-guidance, e.g. 3.5 (FLUX.1-dev's card)")
    if not embeds and recipe.distilled_guidance is not None:
        raise UserError(f"recipe {recipe.name!r} sets distilled guidance {recipe.distilled_guidance:g}, but this "
                        "model's transformer has no guidance embedding (FLUX.1-schnell's has none): use a "
                        "recipe without it (flux-schnell on FLUX.1-schnell) or a FLUX.1-dev --model")
    return {} if recipe.distilled_guidance is None else {"guidance_scale": recipe.distilled_guidance}


def default_negative(family: str, recipe) -> str | None:
    """The negative prompt true CFG needs to run at all when the user gives none; None elsewhere."""
    return EMPTY_NEGATIVE[family] if family in TRUE_CFG and recipe.guidance > 1 else None
