"""Control fidelity of the mini scribble ControlNet against steps (``hypersd eval-control``).

Each eval-split prompt is drawn with a scribble given as white strokes on black, twice:
with its own emoji's scribble (*matched*) and with another emoji's (*crossed*, a fixed
pairing of the split). The mini teacher memorises its emoji, so a prompt alone already
fixes the drawing: only the crossed case shows whether the strokes steer it. Two numbers per
row, each with a 95% bootstrap interval:
  control F1  ``edge_f1`` of the given scribble and the scribble read back from the output
              (1-pixel tolerance): how far the drawing follows the strokes;
  top-1       the emoji network names the prompt's emoji: how far it still follows the prompt;
              in the crossed case also how often it names the scribble's emoji instead.
Control fidelity, the number the accelerator is judged by, is the crossed F1: with matched
strokes the prompt alone already draws them (the first row shows how well).
Rows: the teacher without ControlNet (the floor), the teacher with it at 25 steps (the
reference), and the accelerator with it at each step count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypersd.controlnet.scribble import as_control_image, edge_f1, scribble
from hypersd.data import load_emoji32
from hypersd.errors import UserError
from hypersd.files import write_file
from hypersd.generate import load_loras, load_pipeline, resolve_recipe, run_pipeline
from hypersd.demo import BUNDLED_LORA
from hypersd.teacher.controlnet import CONTROLNET_DIR


@dataclass
class ControlEvalConfig:
    controlnet: str = str(CONTROLNET_DIR)
    lora: str = str(BUNDLED_LORA)          # the accelerator
    recipe: str = "hyper-sd-unified"       # the accelerator's sampler settings
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    scale: float = 1.0                     # controlnet_conditioning_scale
    reference_steps: int = 25              # the teacher rows' DDIM steps
    seed: int = 0
    batch: int = 105
    prompts: int = 0                       # the first N eval prompts only (0: all 420)
    out_dir: str = "benchmarks/controlnet"

    def __post_init__(self):
        if not self.steps or any(not isinstance(n, int) or n < 1 for n in self.steps):
            raise UserError(f"--steps: step counts must be whole numbers of 1 or more, not {self.steps}")
        if not 0 <= self.scale <= 2:  # also refuses nan
            raise UserError(f"--scale {self.scale}: a ControlNet scale runs from 0 to 2 (1 as trained)")
        if self.prompts < 0 or self.batch < 1:
            raise UserError("--prompts must be 0 (all) or more, and batch at least 1")


def eval_split_scribbles() -> tuple[list[str], torch.Tensor]:
    """Each eval prompt (once) and the scribble of its first image, (N, 1, 32, 32)."""
    from hypersd.evaluate import reference_images
    prompts = list(dict.fromkeys(load_emoji32().prompts("eval")))
    return prompts, scribble((reference_images(prompts, "eval") + 1) / 2)


def _pil(maps: torch.Tensor) -> list[Image.Image]:
    arr = (as_control_image(maps).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def draw(pipe, prompts, recipe, seeds, controls, scale, batch) -> list[Image.Image]:
    """One image per prompt and seed; ``controls`` None draws without ControlNet."""
    out = []
    for s in range(0, len(prompts), batch):
        extra = None if controls is None else {"image": controls[s:s + batch],
                                               "controlnet_conditioning_scale": scale}
        out += run_pipeline(pipe, prompts[s:s + batch], recipe, seeds[s:s + batch], extra=extra)
    return out


def score(images: list[Image.Image], wanted: torch.Tensor, prompts: list[str], metrics,
          drawn: list[str] | None = None) -> dict:
    """Control F1 and the prompt's top-1, each with an interval; with ``drawn`` (the emoji each
    scribble came from, where it is not the prompt's) also that emoji's top-1."""
    from hypersd.metrics.mini import to_tensor
    from hypersd.metrics.stats import bootstrap_ci
    f1 = edge_f1(wanted, scribble((to_tensor(images) + 1) / 2)).double().numpy()
    out = {"f1": float(f1.mean()), "f1_ci": bootstrap_ci(lambda i: f1[i].mean(), len(f1))}
    for key, names in (("top1", prompts), ("top1_scribble", drawn)):
        if names is not None:
            hit = (metrics.score(images, names).rank == 0).astype(np.float64) * 100
            out[key], out[f"{key}_ci"] = float(hit.mean()), bootstrap_ci(lambda i: hit[i].mean(), len(hit))
    return out


def evaluate_control(cfg: ControlEvalConfig) -> list[dict]:
    """Every row (see the module doc); writes results.json and table.md under ``out_dir``."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from hypersd.metrics.mini import MiniMetrics
    if not (Path(cfg.controlnet) / "config.json").exists():
        raise UserError(f"no ControlNet in {cfg.controlnet}: train it with "
                        "`hypersd train-teacher --phase controlnet --export`")
    recipes = {n: resolve_recipe(cfg.recipe, steps=n) for n in cfg.steps}  # bad steps fail before any work
    prompts, maps = eval_split_scribbles()
    if cfg.prompts:
        prompts, maps = prompts[:cfg.prompts], maps[:cfg.prompts]
    shift = len(maps) // 2
    crossed = torch.roll(maps, shift, dims=0)  # prompt i gets the scribble of prompt i - shift
    crossed_from = prompts[len(prompts) - shift:] + prompts[:len(prompts) - shift]
    seeds = [cfg.seed] * len(prompts)
    base, metrics = load_pipeline(), MiniMetrics()
    net = ControlNetModel.from_pretrained(cfg.controlnet, use_safetensors=True).to(base.device, base.dtype)
    pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    rows = []

    def row(label, steps, pipe_, recipe, controlled=True):
        for case, wanted, drawn in (("matched", maps, None), ("crossed", crossed, crossed_from)):
            images = draw(pipe_, prompts, recipe, seeds, _pil(wanted) if controlled else None, cfg.scale, cfg.batch)
            rows.append({"method": label, "steps": steps, "case": case,
                         **score(images, wanted, prompts, metrics, drawn)})
            print(f"{label:34s} {steps:3d} {case:8s} F1 {rows[-1]['f1']:.3f}  top-1 {rows[-1]['top1']:.1f}%")

    teacher = resolve_recipe("teacher", steps=cfg.reference_steps)
    row("teacher, no ControlNet", cfg.reference_steps, base, teacher, controlled=False)
    row("teacher + ControlNet", cfg.reference_steps, pipe, teacher)
    load_loras(pipe, [(cfg.lora, resolve_recipe(cfg.recipe, steps=1).lora_scale)])
    for n, recipe in recipes.items():
        row(f"{cfg.recipe} LoRA + ControlNet", n, pipe, recipe)
    out = Path(cfg.out_dir)
    write_file(out / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1) + "\n"))
    write_file(out / "table.md", lambda tmp: tmp.write_text(control_table(rows)))
    return rows


def control_table(rows: list[dict]) -> str:
    """Rows by method and steps; control F1 and top-1 for the matched and the crossed scribbles."""
    head = ("| method | steps | F1, matched ↑ | top-1 %, matched ↑ | F1, crossed (control fidelity) ↑ | "
            "top-1 % (prompt), crossed | top-1 % (scribble's emoji), crossed |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    cell = lambda r, k, d: f"{r[k]:.{d}f} [{r[k + '_ci'][0]:.{d}f}, {r[k + '_ci'][1]:.{d}f}]"  # noqa: E731
    lines = []
    for (method, steps) in dict.fromkeys((r["method"], r["steps"]) for r in rows):
        m, c = ({r["case"]: r for r in rows if (r["method"], r["steps"]) == (method, steps)}[k]
                for k in ("matched", "crossed"))
        lines.append(f"| {method} | {steps} | {cell(m, 'f1', 3)} | {cell(m, 'top1', 1)} | "
                     f"{cell(c, 'f1', 3)} | {cell(c, 'top1', 1)} | {cell(c, 'top1_scribble', 1)} |")
    return head + "\n".join(lines) + "\n"
