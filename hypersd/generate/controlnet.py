"""ControlNet in ``generate``: ControlNets (diffusers folders or hub ids), each with a control
image and a conditioning scale, checked against the base model and run by diffusers' ControlNet
pipelines built from the loaded base pipeline's components, so its LoRAs, its scheduler and
every recipe work as without ControlNet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from hypersd.errors import UserError
from hypersd.generate.loading import _quiet_loading, _reason, refuse_pickle
from hypersd.generate.recipes import out_of_range

MAX_CONTROL_SCALE = 2.0  # 0 turns a ControlNet off, 1 applies it as trained; beyond 2 its residuals
                         # swamp the UNet's features (surely a typo)
RGB_CHANNELS = 3         # the pipelines read control images as RGB
FOLDER_HELP = "pass a diffusers ControlNet folder (config.json + .safetensors) or a hub id (owner/name)"


@dataclass(frozen=True)
class Control:
    """One ControlNet with its control image (one image for every prompt and seed)."""

    model: str                  # a diffusers ControlNet folder or a hub id
    image: str | Image.Image    # a file Pillow reads, or an image
    scale: float = 1.0          # controlnet_conditioning_scale, in [0, MAX_CONTROL_SCALE]

    def record(self) -> dict:
        """What the PNG metadata says about it."""
        image = self.image if not isinstance(self.image, Image.Image) else (
            getattr(self.image, "filename", "") or "<image>")
        return {"model": self.model, "image": str(image), "scale": self.scale}


@dataclass(frozen=True)
class _Checked:
    control: Control
    config: dict                # the ControlNet's config.json
    image: Image.Image          # RGB, at its own size


def pair_controls(models: list[str] | None, images: list[str] | None,
                  scales: list[float] | None) -> list[Control]:
    """The command line's repeated --controlnet, --control-image and --control-scale, matched
    in order; without --control-scale every scale is 1."""
    models, images, scales = models or [], images or [], scales or []
    if len(images) != len(models) or (scales and len(scales) != len(models)):
        raise UserError(f"{len(models)} --controlnet, {len(images)} --control-image and {len(scales)} "
                        "--control-scale: give one --control-image per --controlnet, and one "
                        "--control-scale per --controlnet or none (each then 1)")
    return [Control(m, i, s) for m, i, s in zip(models, images, scales or [1.0] * len(models))]


def check_controls(controls) -> list[_Checked]:
    """Scales, ControlNet configs and control images, refused before the base model loads.
    ``controls`` holds ``Control``s or ``(model, image[, scale])`` tuples."""
    checked = []
    for c in controls:
        c = _as_control(c)
        why = out_of_range(c.scale, 0, MAX_CONTROL_SCALE)
        if why:
            raise UserError(f"ControlNet {c.model}: control scale {c.scale!r} is {why}: use a number from 0 "
                            f"(off) to {MAX_CONTROL_SCALE:g} (1 applies it as trained)")
        checked.append(_Checked(c, _controlnet_config(str(c.model)), read_control_image(c.image)))
    return checked


def _as_control(c) -> Control:
    if isinstance(c, Control):
        return c
    if not isinstance(c, (tuple, list)) or not 2 <= len(c) <= 3:
        raise UserError(f"controlnets: {c!r} is not a (model, image) or (model, image, scale) tuple")
    return Control(*c)


def _controlnet_config(model: str) -> dict:
    from diffusers import ControlNetModel
    path = Path(model)
    refuse_pickle(path, "ControlNet")
    if path.is_file():
        raise UserError(f"ControlNet {model} is a file: {FOLDER_HELP}")
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"ControlNet folder {model} has no config.json: {FOLDER_HELP}")
    if not path.is_dir() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise UserError(f"ControlNet {model} not found: {FOLDER_HELP}")
    try:
        with _quiet_loading():
            config = dict(ControlNetModel.load_config(model))
    except Exception as e:  # noqa: BLE001 - hub and JSON errors come in many types
        raise UserError(f"cannot read ControlNet {model}'s config ({_reason(e)}): {FOLDER_HELP}; "
                        "download a hub model first when offline") from e
    if config.get("_class_name") != "ControlNetModel":
        raise UserError(f"ControlNet {model} holds a {config.get('_class_name')}, not a ControlNetModel: "
                        f"{FOLDER_HELP}")
    return config


def read_control_image(image) -> Image.Image:
    """A control image as RGB: a PIL image, or a file Pillow can read whole."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.exists():
        raise UserError(f"control image {image} does not exist: check the path")
    if path.is_dir():
        raise UserError(f"control image {image} is a folder: pass an image file (PNG, JPEG, WebP)")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"control image {image} is not an image Pillow can read ({_reason(e)}): "
                        "pass a PNG, JPEG or WebP file") from e


def check_fits(config: dict, unet, vae_scale_factor: int, model: str) -> None:
    """A ControlNet adds residuals to the UNet's encoder features: it must take the same latents
    and text conditioning, have the same blocks, and map a control image at the pipeline's
    resolution onto the latent grid."""
    mine, theirs = _shape(config), _shape(dict(unet.config))
    theirs["conditioning_channels"] = RGB_CHANNELS
    theirs["image-to-latent downsampling"] = vae_scale_factor
    for key, value in mine.items():
        if value != theirs[key]:
            raise UserError(f"ControlNet {model} does not fit this base model: its {key} is {value}, the "
                            f"model's {theirs[key]}{_families(mine, theirs)}: pass a ControlNet made for "
                            "this base model")


def _shape(config: dict) -> dict:
    """What must agree between a ControlNet and a UNet (a ControlNet's own fields, when given)."""
    text_time = config.get("addition_embed_type") == "text_time"  # SDXL's pooled text and time ids
    shape = {"in_channels": config.get("in_channels"),
             "cross_attention_dim": config.get("cross_attention_dim"),
             "addition_embed_type": config.get("addition_embed_type"),
             "addition_time_embed_dim": config.get("addition_time_embed_dim") if text_time else None,
             "projection_class_embeddings_input_dim":
                 config.get("projection_class_embeddings_input_dim") if text_time else None,
             "block_out_channels": list(config.get("block_out_channels") or []),
             "layers_per_block": config.get("layers_per_block")}
    if "conditioning_embedding_out_channels" in config:
        shape["conditioning_channels"] = config.get("conditioning_channels", RGB_CHANNELS)
        # [the conditioning embedding halves the image at each block after the first, ControlNet §3.2]
        shape["image-to-latent downsampling"] = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    return shape


def _families(mine: dict, theirs: dict) -> str:
    family = {True: "SDXL", False: "SD1.5"}
    a, b = (family[s["addition_embed_type"] == "text_time"] for s in (mine, theirs))
    return f" (a ControlNet for {a}-shaped models on an {b}-shaped model)" if a != b else ""


def add_controlnets(pipe, checked: list[_Checked]) -> tuple[object, dict]:
    """The base pipeline's ControlNet twin, sharing its modules (LoRAs included), and the
    pipeline-call arguments for the control images; ``(pipe, {})`` without ControlNets."""
    if not checked:
        return pipe, {}
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                           StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline)
    if isinstance(pipe, StableDiffusionXLPipeline):
        cls = StableDiffusionXLControlNetPipeline
    elif isinstance(pipe, StableDiffusionPipeline):
        cls = StableDiffusionControlNetPipeline
    else:
        raise UserError(f"ControlNet needs an SD1.5- or SDXL-shaped pipeline, not a {type(pipe).__name__}")
    for c in checked:
        check_fits(c.config, pipe.unet, pipe.vae_scale_factor, c.control.model)
    nets = [_load_controlnet(ControlNetModel, c.control.model, pipe) for c in checked]
    with _quiet_loading():  # from_pipe's advice on casting modules already in the model's dtype
        control_pipe = cls.from_pipe(pipe, controlnet=nets[0] if len(nets) == 1 else nets,
                                     dtype=pipe.unet.dtype)
    control_pipe.set_progress_bar_config(disable=True)
    height, width = _resolution(pipe)
    images = [c.image if c.image.size == (width, height) else
              c.image.resize((width, height), Image.Resampling.LANCZOS) for c in checked]
    scales = [float(c.control.scale) for c in checked]
    single = len(checked) == 1
    return control_pipe, {"image": images[0] if single else images, "height": height, "width": width,
                          "controlnet_conditioning_scale": scales[0] if single else scales}


def _load_controlnet(cls, model: str, pipe):
    try:
        with _quiet_loading():
            net = cls.from_pretrained(model, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - missing or broken weights, hub errors
        raise UserError(f"cannot load ControlNet {model} ({_reason(e)}): {FOLDER_HELP}, "
                        "with .safetensors weights") from e
    with _quiet_loading():
        return net.to(pipe.device, pipe.unet.dtype)


def _resolution(pipe) -> tuple[int, int]:
    """(height, width) the model draws at: its UNet's sample size times the VAE's scale factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
