"""How long distillation waits for data: a synthetic image folder, its latent cache built once
(timed), then training steps of the bundled mini model on the warm cache, with and without
workers drawing batches ahead. Reports the share of each step's wall time spent inside
``examples.sample`` and writes benchmarks/data-throughput.md and .json.

    .venv/bin/python scripts/data_throughput.py                          # 10,000 images, 50 steps
    .venv/bin/python scripts/data_throughput.py --images 200 --steps 5 --out /tmp/dt   # a quick check

The step is the loop's own (``StageTrainer.step``), timed from outside; nothing is re-implemented.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypersd.bench import cpu_name
from hypersd.distill import loop
from hypersd.distill.cache import ensure_cache
from hypersd.distill.data import examples_for
from hypersd.distill.recipe import DataSettings, RunConfig, StageConfig
from hypersd.generate.loading import load_pipeline
from hypersd.quiet import quiet_libraries


def make_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` random 32x32 PNGs and their metadata.jsonl (HF imagefolder layout); kept if already there."""
    meta = folder / "metadata.jsonl"
    if meta.exists() and sum(1 for _ in meta.open()) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with meta.open("w") as f:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            (folder / f"{i:06d}.png").write_bytes(buf.getvalue())
            f.write(json.dumps({"file_name": f"{i:06d}.png", "text": f"synthetic image {i % 997}"}) + "\n")
    return folder


class Timed:
    """Examples whose ``sample`` calls are timed, each booked to the step it ran in."""

    def __init__(self, examples):
        self.examples, self.has_images = examples, examples.has_images
        self.waits: list[float] = []
        self.in_step = False

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, n, g):
        start = time.perf_counter()
        batch = self.examples.sample(n, g)
        if self.in_step:
            self.waits.append(time.perf_counter() - start)
        return batch


def timed_steps(run: RunConfig, pipe, examples: Timed) -> list[float]:
    """Run ``run`` and return the wall time of each of its steps."""
    times, real_step = [], loop.StageTrainer.step

    def step(trainer, i):
        examples.in_step, start = True, time.perf_counter()
        try:
            return real_step(trainer, i)
        finally:
            times.append(time.perf_counter() - start)
            examples.in_step = False
    loop.StageTrainer.step = step
    try:
        loop.distill(run, examples=examples, pipe=pipe)
    finally:
        loop.StageTrainer.step = real_step
    return times


def measure(args, data: DataSettings, workers: int) -> dict:
    """Steps of a fresh mini model (its cache entry is the one built: the same weights)."""
    pipe = load_pipeline("mini", dtype=torch.float32, device="cpu")
    settings = dataclasses.replace(data, num_workers=workers)
    out = Path(args.work) / f"run-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    stage = StageConfig.make("tscd", steps=args.steps, batch_size=args.batch, segments=4)
    run = RunConfig(stages=[stage], model="mini", output_dir=str(out), data=settings,
                    checkpoint_every=args.steps, log_every=args.steps)
    examples = Timed(examples_for(pipe, run))
    steps = timed_steps(run, pipe, examples)[args.warmup:]
    waits = examples.waits[args.warmup:]
    hits = getattr(examples.examples, "hits", None)
    return {"workers": workers, "steps": len(steps), "step_ms": 1000 * float(np.mean(steps)),
            "sample_ms": 1000 * float(np.mean(waits)), "waiting": float(sum(waits) / sum(steps)),
            "drawn_ahead": hits}


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "data-throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {r['workers']} | {r['steps']} | {r['step_ms']:.1f} | {r['sample_ms']:.2f} | "
                     f"{100 * r['waiting']:.2f}% | {r['drawn_ahead'] if r['drawn_ahead'] is not None else '-'} |"
                     for r in result["runs"])
    c = result["cache"]
    (out / "data-throughput.md").write_text(
        f"# Data throughput: the latent cache under a training step\n\n"
        f"`{result['command']}` on {result['machine']}, torch threads {result['threads']}.\n\n"
        f"A folder of {c['images']} random 32x32 PNGs (metadata.jsonl) encoded by the mini model's VAE and "
        f"text encoder into the cache once: {c['seconds']:.1f} s ({c['images'] / c['seconds']:.0f} images/s, "
        f"{c['workers']} decoding workers), {c['megabytes']:.1f} MB on disk; asked again, the same entry was "
        f"{'reused' if c['reused'] else 'NOT reused'} in {c['reuse_seconds']:.2f} s.\n\n"
        f"Then TSCD steps (batch {result['batch']}) of the mini model on the warm cache; the first "
        f"{result['warmup']} steps are left out. *waiting* is the time inside `examples.sample` over the "
        f"step's wall time; *drawn ahead* counts batches the workers had ready.\n\n"
        f"| workers | steps | step (ms) | sample (ms) | waiting | drawn ahead |\n|---|---|---|---|---|---|\n{rows}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the means")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,2", help="comma-separated num_workers to compare")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--work", default="/tmp/hypersd-data-throughput", help="images, cache and runs")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.warmup = min(args.warmup, args.steps - 1)
    work = Path(args.work)
    folder = make_folder(work / f"images-{args.images}", args.images)
    shutil.rmtree(work / "cache", ignore_errors=True)
    data = DataSettings(source=str(folder), cache_dir=str(work / "cache"), num_workers=2)
    pipe = load_pipeline("mini", dtype=torch.float32, device="cpu")
    start = time.perf_counter()
    entry, _ = ensure_cache(pipe, data)
    built = time.perf_counter() - start
    start = time.perf_counter()
    again, _ = ensure_cache(pipe, data)  # the same entry, found and reused, not rebuilt
    cache = {"images": args.images, "seconds": built, "reuse_seconds": time.perf_counter() - start,
             "reused": again == entry, "workers": data.num_workers,
             "megabytes": sum(p.stat().st_size for p in entry.iterdir()) / 2**20}
    runs = [measure(args, data, int(w)) for w in args.workers.split(",")]
    result = {"command": "python scripts/data_throughput.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("work", "out")),
        "machine": f"{cpu_name()} ({os.cpu_count()} CPUs)",
        "threads": torch.get_num_threads(), "batch": args.batch, "warmup": args.warmup, "cache": cache, "runs": runs}
    write(Path(args.out), result)
    for r in runs:
        print(f"workers {r['workers']}: step {r['step_ms']:.1f} ms, waiting for data {100 * r['waiting']:.2f}%")
    print(f"wrote {args.out}/data-throughput.md and .json")


if __name__ == "__main__":
    main()
