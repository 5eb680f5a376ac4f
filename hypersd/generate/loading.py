"""Loading a base pipeline (bundled, diffusers folder, hub id or single file; SD1.5, SDXL, SD3,
FLUX or Qwen-Image), a replacement UNet (a full-network student) and LoRAs, and the pipeline-call
arguments a recipe sets."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, LCMScheduler, QwenImagePipeline, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, TCDScheduler,
                       UNet2DConditionModel)

from hypersd.errors import UserError
from hypersd.files import check_safetensors
from hypersd.generate.flow import default_negative, guidance_arguments
from hypersd.generate.recipes import FLOW_SAMPLERS, MODELS, SD_MODELS, check_lora_scale, recipes_for
from hypersd.models.mini import MINI_DIR, load_text_encoder
from hypersd.models.mini_flow import MINI_FLOW_DIR, load_flow_text_encoder

PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline,
             "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
             "StableDiffusion3Pipeline": StableDiffusion3Pipeline,
             "FluxPipeline": FluxPipeline, "QwenImagePipeline": QwenImagePipeline}
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
              "lcm": LCMScheduler, "tcd": TCDScheduler, "flow_euler": FlowMatchEulerDiscreteScheduler}
# A transformer's class says its model family (a UNet's family: model_family)
TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                "QwenImageTransformer2DModel": "qwen-image"}
# Half precision on a GPU: SD's fp16; the flow models' cards run them in bf16 (FLUX.1, SD3.5,
# Qwen-Image), whose range their activations need
HALF = {"sd15": torch.float16, "sdxl": torch.float16, "sd3": torch.bfloat16, "flux": torch.bfloat16,
        "qwen-image": torch.bfloat16}
OWN_SCHEDULER = "_hypersd_own_scheduler"  # a pipeline's attribute: its model's flow scheduler config
BUNDLED = "mini"
BUNDLED_FLOW = "mini-flow"  # the mini flow model (hypersd.models.mini_flow)
PICKLED = (".bin", ".pt", ".pth", ".ckpt")  # pickles: loading one may run code, so none is read


def _model_index(model: str) -> dict:
    folder = Path(model)
    if folder.is_dir():
        index = folder / "model_index.json"
        if not index.exists():
            raise UserError(f"{model} has no model_index.json: pass a diffusers pipeline folder")
        return json.loads(index.read_text())
    if folder.suffix or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model {model!r} not found: pass a diffusers folder, a hub id "
                        "(owner/name) or a .safetensors checkpoint")
    try:
        from diffusers import DiffusionPipeline
        return DiffusionPipeline.load_config(model)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise UserError(f"cannot load hub model {model!r} ({type(e).__name__}); download it "
                        "first or pass a local folder") from e


def _mini_text_encoders(cls, index: dict) -> dict:
    """Mini-world pipelines store no text encoder: MiniLM comes from its package (for FLUX's
    two slots, one MiniLM with its pooler: ``hypersd.models.mini_flow``)."""
    if index.get("text_encoder", [None])[0] is not None:
        return {}
    if cls is StableDiffusionPipeline:
        tokenizer, encoder = load_text_encoder()
        return {"tokenizer": tokenizer, "text_encoder": encoder}
    if cls is FluxPipeline:
        tokenizer, encoder = load_flow_text_encoder()
        return {"tokenizer": tokenizer, "text_encoder": encoder, "tokenizer_2": tokenizer, "text_encoder_2": encoder}
    return {}


def refuse_pickle(path: str | Path, what: str) -> None:
    """Weights stored as a pickle are refused: unpickling a file may run any code it names."""
    if Path(path).suffix.lower() in PICKLED:
        raise UserError(f"{what} {path} is a pickle ({Path(path).suffix}), which hypersd does not read "
                        "(loading one can run code): use its .safetensors version")


def _is_sdxl_checkpoint(path: Path) -> bool:
    from safetensors import safe_open
    check_safetensors(path, "checkpoint")
    with safe_open(str(path), "pt") as f:
        return any(k.startswith("conditioner.") for k in f.keys())


def load_pipeline(model: str | None = None, dtype: torch.dtype | None = None,
                  device: str | None = None, config: str | None = None, unet: str | None = None):
    """The diffusers pipeline for ``model`` (``PIPELINES``): None or "mini" is the bundled teacher.

    The pipeline class is read from the folder's model_index.json. A single-file checkpoint
    (.safetensors, SD1.5 or SDXL) is loaded with ``from_single_file``; offline, pass ``config``,
    a folder or hub id holding the matching diffusers configuration. ``unet`` replaces the
    pipeline's UNet (see ``load_unet``). Without ``dtype``: float32 on the CPU, half precision
    on a GPU (``HALF``).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _load_base(model, config)
    family = model_family(pipe)
    dtype = dtype or (HALF[family] if device == "cuda" else torch.float32)
    if unet is not None:
        if family not in SD_MODELS:
            raise UserError(f"--unet replaces an SD1.5 or SDXL UNet, and this {MODELS[family]} model has a "
                            "transformer instead: pass a LoRA for it, or an SD1.5/SDXL --model")
        pipe.unet = load_unet(unet, pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def load_unet(path: str, like) -> UNet2DConditionModel:
    """A whole UNet (e.g. a one-step full-network student) in place of ``like``: a diffusers
    UNet folder, or one .safetensors file with diffusers keys or the original layout's
    (``model.diffusion_model.``), read with ``like``'s configuration."""
    from safetensors.torch import load_file

    from hypersd.models.single_file import ldm_to_unet
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"{path} has no config.json: pass a diffusers UNet folder or a .safetensors file")
        try:
            unet = UNet2DConditionModel.from_pretrained(p, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, TypeError) as e:  # broken config or weights
            raise UserError(f"cannot load UNet folder {path} ({_reason(e)}): pass a complete "
                            "diffusers UNet folder with .safetensors weights") from e
        _check_fits(unet.state_dict(), like, path)
        return unet
    if not p.exists():
        raise UserError(f"UNet {path} not found: pass a diffusers UNet folder or a .safetensors file")
    if p.suffix != ".safetensors":
        raise UserError(f"UNet {path} is not a .safetensors file: pass a diffusers UNet folder or a "
                        ".safetensors file")
    check_safetensors(p, "UNet")
    state = load_file(str(p))
    unet = UNet2DConditionModel.from_config(like.config)
    try:
        if any(k.startswith("model.diffusion_model.") for k in state):
            state = ldm_to_unet(state, unet)
    except ValueError as e:
        raise UserError(f"UNet {path} does not fit this base model: {e}") from e
    _check_fits(state, like, path)
    unet.load_state_dict(state)
    return unet


def _check_fits(state: dict, like, path: str) -> None:
    want = like.state_dict()
    wrong = sorted(set(want) ^ set(state)) + [k for k in set(want) & set(state) if want[k].shape != state[k].shape]
    if wrong:
        raise UserError(f"UNet {path} does not fit this base model ({len(wrong)} weights missing, extra or "
                        f"of another shape, e.g. {wrong[0]}): pass a UNet of this model's architecture")


def _load_base(model: str | None, config: str | None):
    model = model or BUNDLED
    if model in (BUNDLED, BUNDLED_FLOW):
        folder, script = (MINI_DIR, "train_teacher.sh") if model == BUNDLED else (MINI_FLOW_DIR, "train_flow.sh")
        if not (folder / "model_index.json").exists():
            raise UserError(f"the bundled {model} model is missing from {folder}: run scripts/{script}")
        model = str(folder)
    path = Path(model)
    refuse_pickle(path, "checkpoint")
    if path.suffix == ".safetensors":
        if not path.exists():
            raise UserError(f"checkpoint {model} does not exist")
        cls = StableDiffusionXLPipeline if _is_sdxl_checkpoint(path) else StableDiffusionPipeline
        try:
            pipe = cls.from_single_file(model, config=config)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot load single-file checkpoint {model} ({_reason(e)}): offline, "
                            "pass --config with the model's diffusers folder") from e
        return pipe
    index = _model_index(model)
    cls = PIPELINES.get(index.get("_class_name"))
    if cls is None:
        raise UserError(f"{model} is a {index.get('_class_name')}; supported: {', '.join(PIPELINES)}")
    extra = _mini_text_encoders(cls, index)
    if cls is StableDiffusionPipeline and extra:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(model, use_safetensors=True, **extra)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load {model} ({_reason(e)}): pass a complete diffusers pipeline "
                        "folder with .safetensors weights") from e
    return pipe


def parse_lora(spec: str) -> tuple[str, float | None]:
    """'PATH' or 'PATH:SCALE' -> (path, scale or None); a scale is a finite number within
    ±MAX_LORA_SCALE. A path that exists as given, colon and all, is taken whole."""
    path, sep, scale = spec.rpartition(":")
    if (not sep or not path or Path(spec).exists() or scale.startswith(("/", "\\"))
            or scale.lower().endswith((".safetensors", *PICKLED))):
        return spec, None
    try:
        value = float(scale)
    except ValueError:
        raise UserError(f"LoRA scale {scale!r} in {spec!r} is not a number: write PATH:SCALE, "
                        f"e.g. {path}:0.8") from None
    return path, check_lora_scale(value, path)


def check_lora_file(path: str) -> None:
    """A LoRA that exists (a file or a diffusers LoRA folder); a file safetensors can open whole."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"LoRA file {path} does not exist: check the path")
    refuse_pickle(p, "LoRA")
    if p.is_file():
        check_safetensors(p, "LoRA")


def load_loras(pipe, loras: list[tuple[str, float]]) -> list[str]:
    """Load LoRA files (diffusers/peft or kohya format), activate them at their scales and
    return their adapter names."""
    names = []
    for i, (path, scale) in enumerate(loras):
        check_lora_file(path)
        check_lora_scale(scale, path)
        name = f"lora{i}"
        try:
            with _quiet_loading():
                pipe.load_lora_weights(path, adapter_name=name, use_safetensors=True)
        except Exception as e:  # noqa: BLE001 - corrupt files and shape mismatches
            raise UserError(f"cannot load LoRA {path}: {_lora_mismatch(e)}: pass a LoRA made for "
                            f"this base model ({_family_name(pipe)}), or the --model it was made for") from e
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise UserError(f"LoRA {path} matched no layer of this model: pass a LoRA made for "
                            f"this base model ({_family_name(pipe)}), or the --model it was made for")
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return names


def _family_name(pipe) -> str:
    return MODELS[model_family(pipe)]


def _lora_mismatch(e: Exception) -> str:
    """What diffusers' or peft's error says about a LoRA, in a few words."""
    text = str(e)
    if "size mismatch" in text:
        return "its layers have other shapes than this model's"
    if "not found in the base model" in text:
        return "none of its layers is in this model"
    return _reason(e)


def _reason(e: Exception) -> str:
    """The first line of a library's error, for a one-line message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200].rstrip(".")


@contextmanager
def _quiet_loading():
    """diffusers' log of the error it raises and peft's warnings about the file's config: the
    caller says what matters in one line."""
    import warnings

    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        dlog.set_verbosity(level)


def model_family(pipe) -> str:
    """A loaded pipeline's model family (``recipes.MODELS``), told by its denoiser: a UNet with a
    second text encoder is SDXL's, one without SD1.5's; a transformer by its class."""
    if getattr(pipe, "unet", None) is not None:
        return "sdxl" if "text_encoder_2" in pipe.components else "sd15"
    name = type(getattr(pipe, "transformer", None)).__name__
    if name not in TRANSFORMERS:
        raise UserError(f"a {type(pipe).__name__} is none of the models hypersd runs: pass an "
                        f"{', '.join(MODELS.values())} model")
    return TRANSFORMERS[name]


def check_recipe_fits(pipe, recipe) -> str:
    """The pipeline's model family, if the recipe is written for it; else a UserError naming the
    recipes that are."""
    family = model_family(pipe)
    if family not in recipe.models:
        raise UserError(f"recipe {recipe.name!r} is for {recipe.models_named()} models, and this model is "
                        f"{MODELS[family]}: pass --recipe with one for {MODELS[family]}: "
                        f"{', '.join(recipes_for(family))}")
    return family


def configure_scheduler(pipe, sampler: str, timestep_spacing: str | None = None,
                        prediction_type: str | None = None, **config) -> None:
    """Swap in one of diffusers' schedulers, keeping the model's noise schedule; ``config``
    overrides more of its entries (a flow recipe's shift settings). A flow scheduler starts
    from the model's own config, kept at its first swap: what a recipe leaves out is the
    model's, whatever an earlier recipe on the same pipeline set."""
    if sampler not in SCHEDULERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(SCHEDULERS)}")
    overrides = dict(config)
    if timestep_spacing:
        overrides["timestep_spacing"] = timestep_spacing
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    base = pipe.scheduler.config
    if sampler in FLOW_SAMPLERS:
        base = pipe.__dict__.setdefault(OWN_SCHEDULER, base)
    pipe.scheduler = SCHEDULERS[sampler].from_config(base, **overrides)


def recipe_settings(pipe, recipe, seeds: list[int], output_type: str = "pil") -> dict:
    """The pipeline-call arguments a recipe sets, its scheduler swapped in: one generator per
    seed (so an image is its seed's whatever the batch), steps or explicit timesteps, eta, and
    guidance under the names the model's pipeline takes (``hypersd.generate.flow``)."""
    family = check_recipe_fits(pipe, recipe)
    if recipe.steps > pipe.scheduler.config.num_train_timesteps:
        raise UserError(f"{recipe.steps} steps is more than the model's "
                        f"{pipe.scheduler.config.num_train_timesteps} noise levels: pass fewer --steps")
    configure_scheduler(pipe, recipe.sampler, recipe.timestep_spacing, recipe.prediction_type,
                        **recipe.scheduler_config())
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kwargs = dict(generator=generators, output_type=output_type, **guidance_arguments(pipe, family, recipe),
                  **native_size(pipe, family))
    if recipe.timesteps:
        kwargs["timesteps"] = list(recipe.timesteps)
    else:
        kwargs["num_inference_steps"] = recipe.steps
    if recipe.eta is not None:
        kwargs["eta"] = recipe.eta
    return kwargs


def native_size(pipe, family: str) -> dict:
    """SD3's and FLUX's pipelines draw at a fixed default size (1024 px at 8x): a model trained at
    another size (the mini flow model: 32 px) says so in its VAE's ``sample_size``."""
    size = getattr(pipe.vae.config, "sample_size", None) if family in ("sd3", "flux") else None
    return {"height": size, "width": size} if isinstance(size, int) else {}


def prompt_arguments(pipe, recipe, prompts: list[str], negative: str | None = None) -> dict:
    """The prompts and negative prompts of a pipeline call; FLUX and Qwen-Image, whose true CFG
    runs only with a negative prompt, get their empty one when the recipe guides and the user
    gives none (``hypersd.generate.flow``)."""
    negative = negative or default_negative(model_family(pipe), recipe)
    return {"prompt": prompts, **({"negative_prompt": [negative] * len(prompts)} if negative is not None else {})}
