"""``hypersd bench train-cost``: the loop's own training step against its network passes.

For each case (a recipe and one of its stages) the bench builds the stage exactly as
``hypersd distill`` does (``StageTrainer``: the method, its optimizers, accelerate) and times
``StageTrainer.step``, the step the loop runs: sampling, every phase's forward and backward,
clipping, optimizer steps and the method's after-step work (the EMA update). The floor is the
sum of the method's network passes (``Method.passes``), each timed alone on the same batch;
step / floor is what the loop adds (adapter switching, solver math, sampling, optimizers).
Step and passes are timed in turn, round after round, and each reported as its median.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hypersd.distill.loop import StageTrainer, make_accelerator, setup
from hypersd.distill.recipe import load_run

# one stage of each method as the mini recipes run it (adversarial: hyper-sd-mini's k = 4 stage)
DEFAULT_CASES = ("hyper-sd-mini-mse:1", "hyper-sd-mini:1", "hyper-sd-mini-cfg:1", "lcm-mini:0",
                 "tcd-mini:0", "pcm-mini:0")


@dataclass
class TrainCostConfig:
    cases: tuple[str, ...] = DEFAULT_CASES  # "recipe:stage" (stage index; default 0)
    repeats: int = 10
    out_dir: str = "benchmarks"
    overrides: tuple[str, ...] = ()  # recipe fields for every case, e.g. ("lora.rank=64",)


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn within each round (after one warm-up
    round), so a slow spell of the machine weighs on the step and its passes alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _case(spec: str) -> tuple[str, int]:
    name, _, stage = spec.partition(":")
    return name, int(stage or 0)


def time_case(spec: str, overrides: tuple[str, ...], repeats: int, pipe=None, examples=None) -> dict:
    """Time one stage's step and each of its passes; ``pipe``/``examples`` may be shared."""
    name, index = _case(spec)
    run = load_run(name, list(overrides))
    stage = run.stages[index]
    accelerator = make_accelerator(run)
    pipe, examples, ctx = setup(run, accelerator, examples, pipe)
    trainer = StageTrainer(run, index, ctx, examples, accelerator)
    # step 0 again and again: the draws passes() times (step 0 runs every phase of a method)
    timed = interleaved_medians({"step": lambda: trainer.step(0),
                                 **trainer.method.passes(trainer.sample(0))}, repeats)
    accelerator.free_memory()
    step_s = timed.pop("step")
    passes, floor = timed, sum(timed.values())
    return {"case": spec, "method": stage.method, "stage": stage.name, "phases": trainer.method.phases(0),
            "batch": stage.batch_size, "lora_rank": None if run.full_unet else run.lora.rank,
            "step_ms": 1000 * step_s, "floor_ms": 1000 * floor,
            "passes_ms": {k: 1000 * v for k, v in passes.items()}, "step_over_floor": step_s / floor}


def bench_train_cost(cfg: TrainCostConfig) -> list[dict]:
    """Every case, one after the other, on one base pipeline and one set of examples."""
    base_pipe, examples, rows = None, None, []
    for spec in cfg.cases:
        run = load_run(_case(spec)[0], list(cfg.overrides))
        if base_pipe is None:
            from hypersd.distill.data import emoji32_examples
            from hypersd.generate.loading import load_pipeline
            base_pipe = load_pipeline(run.model, dtype=torch.float32, device="cpu")
            base_unet, examples = copy.deepcopy(base_pipe.unet), emoji32_examples(base_pipe, run.split)
        base_pipe.unet = copy.deepcopy(base_unet)  # each case adds its own adapters
        rows.append(time_case(spec, cfg.overrides, cfg.repeats, base_pipe, examples))
    _write(rows, cfg)
    return rows


def _write(rows: list[dict], cfg: TrainCostConfig) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "repeats": cfg.repeats, "overrides": list(cfg.overrides)}
    (out / "train_cost.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"`hypersd bench train-cost` {' '.join(cfg.overrides)}: the loop's step against the sum of "
             f"its network passes, median of {cfg.repeats}, {meta['threads']} threads\n",
             "| case | method | phases | batch | step ms | floor ms | step / floor | passes (ms) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        passes = ", ".join(f"{k} {v:.0f}" for k, v in r["passes_ms"].items())
        lines.append(f"| {r['case']} | {r['method']} | {'+'.join(r['phases'])} | {r['batch']} | "
                     f"{r['step_ms']:.1f} | {r['floor_ms']:.1f} | {r['step_over_floor']:.3f} | {passes} |")
    (out / "train_cost.md").write_text("\n".join(lines) + "\n")
