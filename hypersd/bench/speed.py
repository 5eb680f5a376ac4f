"""``hypersd bench speed``: latency and throughput against the floor and stock diffusers.

For each setting (the teacher at 25 steps with CFG; a student, the base model with the
accelerator LoRA, at 1/2/4/8 steps without) and batch size, four things are timed in one run,
interleaved, median of ``repeats``:
  ours   hypersd's plain path, ``run_pipeline`` (recipe -> scheduler -> diffusers pipeline), the
         LoRA loaded as adapters;
  fast   the fast path (hypersd.generate.fast): the LoRA fused once, prompt embeddings cached
         (warm, as when a demo redraws a prompt), the UNet and VAE decoder traced;
  stock  a separately loaded stock diffusers pipeline called directly, same weights and inputs,
         the LoRA loaded and fused by diffusers (``load_lora_weights`` + ``fuse_lora``);
  floor  the plain path's network passes alone: text encoder, UNet x steps (doubled batch under
         CFG), VAE decode. The fast path can beat it: it skips the text encoder.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hypersd.demo import BUNDLED_LORA
from hypersd.generate import load_loras, load_pipeline, resolve_recipe, run_pipeline
from hypersd.generate.fast import FastPipeline
from hypersd.generate.loading import BUNDLED, configure_scheduler


@dataclass
class SpeedConfig:
    model: str | None = None
    teacher_steps: int = 25
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batches: list[int] = field(default_factory=lambda: [1, 16])
    repeats: int = 7
    out_dir: str = "benchmarks"
    threads: int = 0
    lora: str | None = None    # the student's LoRA; None: the bundled one on the mini model; "none": none
    speedup: str = "trace"     # the fast path's (hypersd.generate.speedup)

    def student_lora(self) -> str | None:
        if self.lora is None:
            mini = self.model in (None, BUNDLED) and BUNDLED_LORA.exists()
            return str(BUNDLED_LORA) if mini else None
        return None if self.lora == "none" else self.lora


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


def _stock_pipeline(model: str | None):
    """A stock diffusers pipeline on the same weights (the mini model's text encoder given)."""
    from diffusers import StableDiffusionPipeline
    from hypersd.models.mini import MINI_DIR, load_text_encoder
    mini = model in (None, BUNDLED)
    extra = {}
    if mini:
        tokenizer, encoder = load_text_encoder()
        extra = {"text_encoder": encoder, "tokenizer": tokenizer, "safety_checker": None,
                 "requires_safety_checker": False}
    stock = StableDiffusionPipeline.from_pretrained(MINI_DIR if mini else model, use_safetensors=True, **extra)
    stock.set_progress_bar_config(disable=True)
    return stock


def _timed(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, interleaved so that drift hits all alike, after a warm-up each."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rows(cfg: SpeedConfig, name: str, recipes, ours, fast, stock) -> list[dict]:
    rows = []
    for recipe in recipes:
        configure_scheduler(stock, recipe.sampler, recipe.timestep_spacing)
        for b in cfg.batches:
            prompts, seeds = ["rocket"] * b, list(range(b))
            t = _timed({"ours": lambda: run_pipeline(ours, prompts, recipe, seeds),
                        "fast": lambda: run_pipeline(fast, prompts, recipe, seeds),
                        "stock": lambda: stock(prompt=prompts, num_inference_steps=recipe.steps,
                                               guidance_scale=recipe.guidance,
                                               generator=[torch.Generator().manual_seed(s) for s in seeds])},
                       cfg.repeats)
            floor = _floor(ours, prompts, recipe)
            rows.append(dict(setting=f"{name} {recipe.steps} step{'s' * (recipe.steps > 1)}"
                             + (f", CFG {recipe.guidance:g}" if recipe.guidance > 1 else ""),
                             steps=recipe.steps, batch=b, ours_ms_per_image=1000 * t["ours"] / b,
                             images_per_s=b / t["ours"], fast_ms_per_image=1000 * t["fast"] / b,
                             floor_ms_per_image=1000 * floor / b, overhead_pct=100 * (t["ours"] / floor - 1),
                             stock_ms_per_image=1000 * t["stock"] / b, ours_over_stock=t["ours"] / t["stock"],
                             fast_over_stock=t["fast"] / t["stock"]))
            print(_line(rows[-1]), flush=True)
    return rows


def bench_speed(cfg: SpeedConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ours, stock = load_pipeline(cfg.model), _stock_pipeline(cfg.model)
    fast = FastPipeline(ours, fuse=False, speedup=cfg.speedup)  # shares ours' modules, LoRA-free so far
    rows = _rows(cfg, "teacher", [resolve_recipe("teacher", steps=cfg.teacher_steps)], ours, fast, stock)
    lora = cfg.student_lora()
    if lora:
        load_loras(ours, [(lora, 1.0)])
        stock.load_lora_weights(lora)
        stock.fuse_lora()
        student = load_pipeline(cfg.model)
        load_loras(student, [(lora, 1.0)])
        fast = FastPipeline(student, speedup=cfg.speedup)
    students = [resolve_recipe("hyper-sd", steps=n) for n in cfg.student_steps]
    rows += _rows(cfg, "student", students, ours, fast, stock)
    _write(rows, Path(cfg.out_dir), cfg)
    return rows


HEAD = ("| setting | batch | ours ms/img | img/s | fast ms/img | floor ms/img | overhead % | stock ms/img "
        "| ours/stock | fast/stock |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _line(r: dict) -> str:
    return (f"| {r['setting']} | {r['batch']} | {r['ours_ms_per_image']:.1f} | {r['images_per_s']:.1f} "
            f"| {r['fast_ms_per_image']:.1f} | {r['floor_ms_per_image']:.1f} | {r['overhead_pct']:+.1f} "
            f"| {r['stock_ms_per_image']:.1f} | {r['ours_over_stock']:.3f} | {r['fast_over_stock']:.3f} |")


def _write(rows: list[dict], out: Path, cfg: SpeedConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (out / "speed.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    (out / "speed.md").write_text(f"Machine: {machine}\n\n{HEAD}\n" + "\n".join(map(_line, rows)) + "\n")
