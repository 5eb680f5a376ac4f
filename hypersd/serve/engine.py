"""The models behind ``hypersd serve``, and the caps every request is held to.

The student (the base model with the accelerator LoRA fused in) runs on the fast path
(hypersd.generate.fast); the teacher for the side-by-side is loaded on its first request; the
scribble ControlNet shares the student's modules. One request runs at a time (a lock: the
CPU's cores are already all in use by one), and a request's latency is its generation alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from hypersd.demo import BUNDLED_LORA
from hypersd.errors import UserError, warn
from hypersd.generate import Control, Recipe, load_loras, load_pipeline, resolve_recipe, run_pipeline
from hypersd.generate.api import MAX_SEED
from hypersd.generate.autorecipe import choose_recipe
from hypersd.generate.controlnet import MAX_CONTROL_SCALE, _resolution, add_controlnets, check_controls
from hypersd.generate.fast import FastPipeline
from hypersd.generate.loading import BUNDLED, check_lora_file, parse_lora
from hypersd.generate.recipes import out_of_range
from hypersd.serve.canvas import control_image
from hypersd.serve.config import ServeConfig
from hypersd.teacher.controlnet import CONTROLNET_DIR

EXPORT_HELP = "hypersd train-teacher --phase controlnet --export"


@dataclass
class Drawn:
    """One request's images and what made them."""

    images: list[Image.Image]
    seconds: float                        # the generation alone, not the wait in the queue
    recipe: Recipe
    seeds: list[int]
    control: Image.Image | None = None    # what the ControlNet saw (scribbles)

    @property
    def steps(self) -> int:
        return len(self.recipe.timesteps) if self.recipe.timesteps else self.recipe.steps


class Engine:
    """Load once, then draw: ``text_to_image``, ``teacher`` and ``scribble``."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.lora = _accelerator(cfg)
        choice = choose_recipe(cfg.recipe, None, [self.lora[0]] if self.lora else [])
        self.recipe = resolve_recipe(choice.recipe, steps=choice.steps)
        pipe = load_pipeline(cfg.model)
        if self.lora:
            path, scale = self.lora
            load_loras(pipe, [(path, self.recipe.lora_scale if scale is None else scale)])
        self.height, self.width = _resolution(pipe)
        self.size_step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        self.max_size = cfg.max_size or 2 * max(self.height, self.width)
        self.student = FastPipeline(pipe, speedup=cfg.speedup)
        self.scribbler, self.scribble_problem = self._scribbler()
        self._teacher: FastPipeline | None = None
        self._lock = threading.Lock()
        self._served = 0

    def text_to_image(self, prompt: str, steps: int | None = None, seed: int = 0, recipe: str | None = None,
                      batch: int = 1, size: int = 0) -> Drawn:
        """``batch`` images of ``prompt`` (seeds ``seed, seed+1, ...``) by the student."""
        steps, batch, seed = self._caps(prompt, steps, batch, seed)
        r = resolve_recipe(recipe or self.recipe, steps=steps)
        return self._draw(self.student, prompt, r, seed, batch, self._size(size))

    def teacher(self, prompt: str, seed: int = 0, batch: int = 1, size: int = 0) -> Drawn:
        """The same by the base model alone at ``teacher_steps`` DDIM steps with CFG."""
        _, batch, seed = self._caps(prompt, None, batch, seed)
        r = resolve_recipe("teacher", steps=self.cfg.teacher_steps)
        with self._lock:
            if self._teacher is None:  # loaded on first use: most visitors never ask
                self._teacher = FastPipeline(load_pipeline(self.cfg.model), fuse=False, speedup=self.cfg.speedup)
        return self._draw(self._teacher, prompt, r, seed, batch, self._size(size))

    def scribble(self, prompt: str, drawing: Image.Image | None = None, steps: int | None = None,
                 seed: int = 0, scale: float = 1.0) -> Drawn:
        """One image of ``prompt`` following ``drawing`` (dark strokes on light, or white on
        black; None: no strokes) through the scribble ControlNet."""
        if self.scribbler is None:
            raise UserError(self.scribble_problem)
        steps, _, seed = self._caps(prompt, steps, 1, seed, empty_ok=True)
        why = out_of_range(scale, 0, MAX_CONTROL_SCALE)
        if why:
            raise UserError(f"control scale {scale!r} is {why}: use 0 (off) to {MAX_CONTROL_SCALE:g} "
                            "(1 as trained)")
        if drawing is not None and max(drawing.size) > self.cfg.max_drawing:
            raise UserError(f"the drawing is {drawing.width}x{drawing.height} pixels, above this server's cap "
                            f"of {self.cfg.max_drawing} a side: send a smaller one")
        control = control_image(drawing, (self.width, self.height))
        extra = {"image": control, "controlnet_conditioning_scale": float(scale)}
        drawn = self._draw(self.scribbler, prompt, resolve_recipe(self.recipe, steps=steps), seed, 1, extra)
        drawn.control = control
        return drawn

    def warm_up(self) -> None:
        """One request of each kind, so that the first visitor's is as fast as the rest."""
        self.text_to_image("rocket")
        if self.scribbler is not None:
            self.scribble("rocket")

    def _draw(self, pipe, prompt: str, recipe: Recipe, seed: int, batch: int, extra: dict) -> Drawn:
        seeds = list(range(seed, seed + batch))
        with self._lock:
            start = time.perf_counter()
            images = run_pipeline(pipe, [prompt] * batch, recipe, seeds, extra=extra)
            seconds = time.perf_counter() - start
            self._served += 1
            request = self._served
        for image, s in zip([*images, extra.get("image")], seeds + [None]):
            if image is not None:
                _stamp(image, prompt, s, recipe, request)
        return Drawn(images, seconds, recipe, seeds)

    def _caps(self, prompt, steps, batch, seed, empty_ok: bool = False) -> tuple[int | None, int, int]:
        """The request's steps, batch and seed as whole numbers, each within this server's caps."""
        if not isinstance(prompt, str) or not (prompt.strip() or empty_ok):
            raise UserError("empty prompt: type what to draw")
        if len(prompt) > self.cfg.max_prompt:
            raise UserError(f"the prompt is {len(prompt)} characters, above this server's cap of "
                            f"{self.cfg.max_prompt}: shorten it")
        steps = None if steps is None else _whole(steps, 1, self.cfg.max_steps, "steps")
        batch = _whole(batch, 1, self.cfg.max_batch, "images")
        return steps, batch, _whole(seed, 0, MAX_SEED - batch, "seed")

    def _size(self, size) -> dict:
        """Pipeline arguments for an image ``size`` pixels a side (0: the model's own)."""
        size = _whole(size, 0, self.max_size, "size")
        if size == 0:
            return {}
        if size % self.size_step:
            raise UserError(f"size {size}: this model draws sides that are multiples of {self.size_step} pixels")
        return {"height": size, "width": size}

    def _scribbler(self) -> tuple[FastPipeline | None, str | None]:
        """The student with the scribble ControlNet, or None and what is missing."""
        path = self.cfg.controlnet or (str(CONTROLNET_DIR) if self.cfg.model in (None, BUNDLED) else None)
        if path is None:
            return None, "no scribble ControlNet for this model: restart with --controlnet FOLDER"
        if not Path(path).exists():
            problem = (f"no scribble ControlNet at {path}: " + (
                f"export the mini one ({EXPORT_HELP}) or restart with --controlnet FOLDER"
                if self.cfg.controlnet is None else "restart with --controlnet naming a ControlNet folder"))
            warn(f"{problem}; the scribble tab is off")
            return None, problem
        blank = Image.new("RGB", (self.width, self.height))
        pipe, _ = add_controlnets(self.student.pipe, check_controls([Control(path, blank)]))
        return FastPipeline(pipe, fuse=False, speedup=self.cfg.speedup), None


def _accelerator(cfg: ServeConfig) -> tuple[str, float | None] | None:
    """The LoRA to fuse in, as (path, scale or None: the recipe's)."""
    if cfg.lora == "none":
        return None
    if cfg.lora is None:
        mini = cfg.model in (None, BUNDLED)
        return (str(BUNDLED_LORA), None) if mini and BUNDLED_LORA.exists() else None
    path, scale = parse_lora(cfg.lora)
    check_lora_file(path)
    return path, scale


def _stamp(image: Image.Image, prompt: str, seed: int | None, recipe: Recipe, request: int) -> None:
    """What made an image, in its PNG text chunks (as ``generate`` writes them), with the number of
    the request: Gradio names a returned image's file by its bytes and rewrites that file in place,
    so two requests drawing the same image at once would race (one reading it half written)."""
    info = {"prompt": prompt, "recipe": recipe.name, "steps": str(len(recipe.timesteps or ()) or recipe.steps),
            "request": str(request)}
    image.info.update(info if seed is None else {**info, "seed": str(seed)})


def _whole(value, lo: int, hi: int, what: str) -> int:
    """``value`` as a whole number from ``lo`` to ``hi``, else a UserError naming the cap."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # sliders send 4.0
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{what} {value!r} is not a whole number: give one from {lo} to {hi}")
    if not lo <= value <= hi:
        raise UserError(f"{what} {value} is outside this server's cap of {lo} to {hi}: ask for {lo} to {hi}")
    return value
