"""``hypersd bench realsize``: one training step of a real-size base model on this machine.

A UNet of SD1.5's (or SDXL's) real config with random weights (nothing to download) is the
base; a rank-64 LoRA student trains through the loop's own ``StageTrainer`` (the step
``hypersd distill`` runs: sampling, every phase's forward and backward, optimizers, EMA) on
random latents and text states of the real shapes (SD1.5: 64x64x4 latents, 77x768 text).
Each case runs in a process of its own, so its peak resident memory is its own; the step
time is the median of the timed steps after one warm-up step (which runs every phase).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hypersd.bench import cpu_name
from hypersd.distill.data import Batch, map_cond

# case name -> (method, its fields, gradient checkpointing, mixed precision)
CASES = {
    "tscd": ("tscd", {"segments": 8}, False, "no"),
    "tscd+gc": ("tscd", {"segments": 8}, True, "no"),
    "tscd+bf16": ("tscd", {"segments": 8}, False, "bf16"),
    "tscd+gc+bf16": ("tscd", {"segments": 8}, True, "bf16"),
    "dmd": ("dmd", {"regression_weight": 0.0}, False, "no"),
    "dmd+gc+bf16": ("dmd", {"regression_weight": 0.0}, True, "bf16"),
}


@dataclass
class RealSizeConfig:
    cases: tuple[str, ...] = tuple(CASES)
    model: str = "sd15"                # "sd15" | "sdxl" | "tiny" (tests: hypersd.testing's SD1.5 shape)
    batch: int = 1                     # examples per step
    rank: int = 64                     # LoRA rank (alpha = rank)
    steps: int = 2                     # timed steps after the warm-up step
    out_dir: str = "benchmarks/realsize"


class RandomExamples:
    """Random latents and text states of a real model's shapes (the data does not change cost)."""

    has_images = True

    def __init__(self, latent_shape: tuple[int, ...], cond: dict, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(n, *latent_shape, generator=g)
        self.cond = map_cond(lambda v: v.expand(n, *v.shape[1:]).clone(), cond)
        self.uncond = map_cond(lambda v: torch.zeros_like(v[:1]), cond)

    def __len__(self) -> int:
        return len(self.latents)

    def sample(self, n: int, g: torch.Generator) -> Batch:
        idx = torch.randint(len(self), (n,), generator=g)
        return Batch([""] * n, map_cond(lambda v: v[idx], self.cond),
                     map_cond(lambda v: v.expand(n, *v.shape[1:]), self.uncond), self.latents[idx])


def _pipeline(model: str):
    """A pipeline around the real-size UNet: a small VAE of the real 8x scale (only its config
    is read) and no text encoder (the examples carry text states)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from hypersd.models.mini import SD15_SCHEDULE
    from hypersd.models.real import SD15_UNET, SDXL_UNET
    torch.manual_seed(0)
    if model == "tiny":
        from hypersd.testing import tiny_sd15
        unet = tiny_sd15().unet
    else:
        unet = UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET))
    vae = AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _cond(model: str) -> dict:
    if model == "tiny":
        return {"encoder_hidden_states": torch.randn(1, 16, 32)}
    if model == "sd15":
        return {"encoder_hidden_states": torch.randn(1, 77, 768)}
    return {"encoder_hidden_states": torch.randn(1, 77, 2048),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280),
                                  "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])}}


def run_case(case: str, cfg: RealSizeConfig) -> dict:
    """Build the stage as ``hypersd distill`` does and time its step (in this process)."""
    from hypersd.distill.loop import StageTrainer, make_accelerator, setup
    from hypersd.distill.recipe import LoraSettings, RunConfig, StageConfig
    method, fields, gc, precision = CASES[case]
    with tempfile.TemporaryDirectory() as out:
        run = RunConfig(stages=[StageConfig.make(method=method, steps=cfg.steps + 1, batch_size=cfg.batch,
                                                 **fields)],
                        output_dir=out, lora=LoraSettings(rank=cfg.rank, alpha=float(cfg.rank)),
                        gradient_checkpointing=gc, mixed_precision=precision, model=cfg.model)
        pipe = _pipeline(cfg.model)
        examples = RandomExamples((4,) + (pipe.unet.config.sample_size,) * 2, _cond(cfg.model))
        accelerator = make_accelerator(run)
        pipe, examples, ctx = setup(run, accelerator, examples, pipe)
        trainer = StageTrainer(run, 0, ctx, examples, accelerator)
        times = []
        for step in range(cfg.steps + 1):
            start = time.perf_counter()
            trainer.step(step)
            times.append(time.perf_counter() - start)
    return {"case": case, "method": method, "gradient_checkpointing": gc, "mixed_precision": precision,
            "phases_step0": trainer.method.phases(0), "warmup_s": times[0],
            "step_s": statistics.median(times[1:]), "peak_rss_gib": _peak_rss_gib()}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def bench_realsize(cfg: RealSizeConfig) -> list[dict]:
    """Every case in a fresh process; the table and JSON written to ``cfg.out_dir``."""
    rows = []
    for case in cfg.cases:
        if case not in CASES:
            raise ValueError(f"unknown case {case!r}: use {', '.join(CASES)}")
        child = subprocess.run([sys.executable, "-m", "hypersd.bench.realsize", case, json.dumps(asdict(cfg))],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(_row(rows[-1]), flush=True)
    _write(rows, cfg)
    return rows


def _row(r: dict) -> str:
    return (f"| {r['case']} | {r['method']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
            f"{r['mixed_precision']} | {'+'.join(r['phases_step0'])} | {r['step_s']:.1f} | {r['peak_rss_gib']:.2f} |")


def _write(rows: list[dict], cfg: RealSizeConfig) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_name()
    meta = {**asdict(cfg), "threads": torch.get_num_threads(), "cpu": cpu, "torch": torch.__version__}
    (out / f"{cfg.model}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"`hypersd bench realsize --model {cfg.model}`: one training step of the real-size "
             f"{cfg.model.upper()} UNet (random weights) with a rank-{cfg.rank} LoRA, batch {cfg.batch}, "
             f"median of {cfg.steps} steps after a warm-up; {meta['threads']} threads of {cpu}\n",
             "| case | method | grad. checkpointing | precision | phases | step s | peak RSS GiB |",
             "|---|---|---|---|---|---:|---:|", *map(_row, rows)]
    (out / f"{cfg.model}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # one case, in its own process: print its row as JSON
    print(json.dumps(run_case(sys.argv[1], RealSizeConfig(**json.loads(sys.argv[2])))))
