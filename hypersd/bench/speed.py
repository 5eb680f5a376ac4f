"""``hypersd bench speed``: latency and throughput against the floor and stock diffusers.

For each setting (the teacher at 25 steps with CFG; a student at 1/2/4/8 steps without) and
batch size, three things are timed in one run, interleaved, median of ``repeats``:
  ours   hypersd's ``run_pipeline`` (recipe -> scheduler -> diffusers pipeline);
  stock  a separately loaded stock diffusers pipeline called directly, same weights and inputs;
  floor  the network passes alone: text encoder, UNet x steps (doubled batch under CFG), VAE decode.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hypersd.generate import load_pipeline, resolve_recipe, run_pipeline
from hypersd.generate.loading import configure_scheduler


@dataclass
class SpeedConfig:
    model: str | None = None
    teacher_steps: int = 25
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batches: list[int] = field(default_factory=lambda: [1, 16])
    repeats: int = 7
    out_dir: str = "benchmarks"
    threads: int = 0


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def _floor(pipe, prompts, recipe) -> float:
    """Seconds of the network passes alone for one generation."""
    cfg = recipe.guidance > 1
    b = len(prompts)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    text = lambda: pipe.text_encoder(ids)[0]  # noqa: E731
    t_text = median_time(text, 5) * (2 if cfg else 1)
    emb = text().repeat(2 if cfg else 1, 1, 1)
    size = pipe.unet.config.sample_size
    z = torch.randn(emb.shape[0], pipe.unet.config.in_channels, size, size)
    t = torch.full((emb.shape[0],), 999)
    t_unet = median_time(lambda: pipe.unet(z, t, emb), 5)
    lat = torch.randn(b, pipe.unet.config.in_channels, size, size)
    t_vae = median_time(lambda: pipe.vae.decode(lat), 5)
    return t_text + recipe.steps * t_unet + t_vae


def bench_speed(cfg: SpeedConfig) -> list[dict]:
    from diffusers import StableDiffusionPipeline
    from hypersd.models.mini import load_text_encoder, MINI_DIR

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ours = load_pipeline(cfg.model)
    tokenizer, encoder = load_text_encoder() if cfg.model in (None, "mini") else (None, None)
    stock = StableDiffusionPipeline.from_pretrained(
        cfg.model or MINI_DIR, use_safetensors=True, **({"text_encoder": encoder, "tokenizer": tokenizer,
                                   "safety_checker": None, "requires_safety_checker": False}
                                  if encoder is not None else {}))
    stock.set_progress_bar_config(disable=True)
    settings = [("teacher", resolve_recipe("teacher", steps=cfg.teacher_steps))]
    settings += [("student", resolve_recipe("hyper-sd", steps=n)) for n in cfg.student_steps]
    rows = []
    for name, recipe in settings:
        configure_scheduler(stock, recipe.sampler, recipe.timestep_spacing)
        for b in cfg.batches:
            prompts = ["rocket"] * b
            seeds = list(range(b))
            run_ours = lambda: run_pipeline(ours, prompts, recipe, seeds)  # noqa: E731
            run_stock = lambda: stock(prompt=prompts, num_inference_steps=recipe.steps,  # noqa: E731
                                      guidance_scale=recipe.guidance,
                                      generator=[torch.Generator().manual_seed(s) for s in seeds])
            t_ours, t_stock = [], []
            run_ours(), run_stock()
            for _ in range(cfg.repeats):  # interleaved, so drift hits both alike
                t = time.perf_counter(); run_ours(); t_ours.append(time.perf_counter() - t)
                t = time.perf_counter(); run_stock(); t_stock.append(time.perf_counter() - t)
            ours_s, stock_s = statistics.median(t_ours), statistics.median(t_stock)
            floor = _floor(ours, prompts, recipe)
            rows.append(dict(setting=f"{name} {recipe.steps} step{'s' * (recipe.steps > 1)}"
                             + (f", CFG {recipe.guidance:g}" if recipe.guidance > 1 else ""),
                             steps=recipe.steps, batch=b, ours_ms_per_image=1000 * ours_s / b,
                             images_per_s=b / ours_s, floor_ms_per_image=1000 * floor / b,
                             overhead_pct=100 * (ours_s / floor - 1),
                             stock_ms_per_image=1000 * stock_s / b, ours_over_stock=ours_s / stock_s))
            print(_line(rows[-1]), flush=True)
    _write(rows, Path(cfg.out_dir), cfg)
    return rows


HEAD = ("| setting | batch | ours ms/img | img/s | floor ms/img | overhead % | stock ms/img "
        "| ours/stock |\n|---|---:|---:|---:|---:|---:|---:|---:|")


def _line(r: dict) -> str:
    return (f"| {r['setting']} | {r['batch']} | {r['ours_ms_per_image']:.1f} | {r['images_per_s']:.1f} "
            f"| {r['floor_ms_per_image']:.1f} | {r['overhead_pct']:+.1f} | {r['stock_ms_per_image']:.1f} "
            f"| {r['ours_over_stock']:.3f} |")


def _write(rows: list[dict], out: Path, cfg: SpeedConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (out / "speed.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    (out / "speed.md").write_text(f"Machine: {machine}\n\n{HEAD}\n" + "\n".join(map(_line, rows)) + "\n")
