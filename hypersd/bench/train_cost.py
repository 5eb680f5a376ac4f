"""``hypersd bench train-cost``: one distillation step against its network passes timed alone.

A consistency step runs the teacher with CFG (batch 2n, no gradient), the EMA target
(n, no gradient) and the student (n, forward and backward), then the optimizer and the EMA
update; a CFG-keeping stage (``student_guidance``) runs target and student on 2n as well.
The floor is the sum of those three network passes, each timed alone on the same shapes;
the ratio step / floor is our overhead (adapter switching, solver math, sampling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hypersd.bench.speed import _median_time
from hypersd.distill.data import emoji32_examples
from hypersd.distill.denoiser import Denoiser
from hypersd.distill.loop import _generator, _lora_config
from hypersd.distill.methods import METHODS
from hypersd.distill.networks import Networks
from hypersd.distill.recipe import StageConfig, load_run


@dataclass
class TrainCostConfig:
    recipe: str = "hypersd/recipes/distill/hyper-sd-mini.yaml"
    stage: int = 1
    repeats: int = 10
    batch_size: int = 0            # 0: the stage's own
    out_dir: str = "benchmarks"
    overrides: tuple[str, ...] = ()  # recipe fields, e.g. ("lora.rank=64",)


def bench_train_cost(cfg: TrainCostConfig) -> dict:
    from hypersd.generate.loading import load_pipeline

    run = load_run(cfg.recipe, list(cfg.overrides))
    stage: StageConfig = run.stages[cfg.stage]
    n = cfg.batch_size or stage.batch_size
    pipe = load_pipeline(run.model, dtype=torch.float32, device="cpu")
    examples = emoji32_examples(pipe, run.split)
    nets = Networks(pipe.unet, _lora_config(run))
    alphas = pipe.scheduler.alphas_cumprod.double()
    student, teacher, target = (Denoiser(v, alphas) for v in (nets.student, nets.teacher, nets.target))
    loss_fn = METHODS[stage.method](stage)
    opt = torch.optim.AdamW(nets.trainable(), lr=stage.lr)
    batch = examples.sample(n, _generator(0, 0, 0))
    x, t = batch.latents, torch.full((n,), 500)

    def step():
        per, _ = loss_fn(student, teacher, target, batch, _generator(0, 0, 1))
        per.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        nets.update_target(stage.ema_decay)

    def teacher_pass():
        with torch.no_grad():
            teacher(x, t, batch.cond, batch.uncond, 3.0)

    guided = (batch.uncond, 3.0) if stage.student_guidance else ()  # a CFG-keeping student's passes

    def target_pass():
        with torch.no_grad():
            target(x, t, batch.cond, *guided)

    def student_pass():
        student(x, t, batch.cond, *guided).x0.float().pow(2).mean().backward()
        opt.zero_grad(set_to_none=True)

    timed = {"step": _median_time(step, cfg.repeats), "teacher_cfg": _median_time(teacher_pass, cfg.repeats),
             "target": _median_time(target_pass, cfg.repeats), "student_fwd_bwd": _median_time(student_pass, cfg.repeats)}
    floor = timed["teacher_cfg"] + timed["target"] + timed["student_fwd_bwd"]
    result = {"recipe": cfg.recipe, "overrides": list(cfg.overrides), "stage": stage.name,
              "lora_rank": run.lora.rank if not run.full_unet else None, "batch": n, "threads": torch.get_num_threads(),
              **{f"{k}_ms": 1000 * v for k, v in timed.items()}, "floor_ms": 1000 * floor,
              "step_over_floor": timed["step"] / floor}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in result.items() if k.endswith("_ms"))
    (out / "train_cost.md").write_text(
        f"Stage {stage.name} of {Path(cfg.recipe).stem} {' '.join(cfg.overrides)}, batch {n}, "
        f"LoRA rank {result['lora_rank']}, {result['threads']} threads\n\n| pass | ms |\n|---|---:|\n{rows}\n\n"
        f"step / floor = {result['step_over_floor']:.3f}\n")
    return result
