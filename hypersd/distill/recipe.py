"""A distillation run as typed config: the base model, the LoRA, and a list of stages.

YAML files hold only what differs from these defaults (see ``hypersd/recipes/distill/``). A
stage's fields are the loop's (``StageConfig``) and its method's (the method's config class).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypersd.config import apply_overrides, load_dataclass, load_yaml
from hypersd.errors import UserError

# LCM-LoRA's targets: attention, feed-forward, resnet convs, samplers, time-embedding projections
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                    "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                    "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class LoraSettings:
    rank: int = 64
    alpha: float = 64.0
    targets: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))


@dataclass
class StageConfig:
    """The loop's fields of a stage; every other field of a recipe stage is the method's own
    (its config dataclass in ``hypersd.distill.methods``), kept in ``config``."""

    method: str                          # a registered method: lcm, tcd, pcm, tscd, ...
    steps: int                           # optimizer steps of this stage
    name: str = ""                       # default: "<index>-<method>-k<segments>"
    lr: float = 1e-4                     # the student's learning rate
    batch_size: int = 32                 # examples per optimizer step and process
    start_from: str = "previous"         # "previous" stage, "base" (a fresh LoRA) or a LoRA file
    config: Any = None                   # the method's settings: its dataclass or a mapping

    @classmethod
    def make(cls, method: str, steps: int, **fields) -> "StageConfig":
        """A stage from flat fields, as a recipe writes them: ``make("tscd", 500, segments=4)``."""
        loop = {k: fields.pop(k) for k in list(fields) if k in _LOOP_FIELDS}
        return cls(method=method, steps=steps, **loop, config=fields)


_LOOP_FIELDS = {f.name for f in dataclasses.fields(StageConfig)}


@dataclass
class RunConfig:
    stages: list[StageConfig]
    model: str = "mini"                  # base model: "mini", a diffusers folder or a hub id
    output_dir: str = "runs/distill"
    full_unet: bool = False              # train the whole UNet instead of a LoRA
    lora: LoraSettings = field(default_factory=LoraSettings)
    split: str = "distill"               # emoji32 prompts used for training
    mixed_precision: str = "no"          # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1       # micro-batches per optimizer step: each pass takes
                                         # batch_size / N examples, the update is the same
    max_grad_norm: float = 1.0           # gradients are clipped to this norm, per phase
    checkpoint_every: int = 200
    keep_checkpoints: int = 2            # the newest N checkpoints of a stage are kept
    log_every: int = 20
    seed: int = 0
    offset_noise: float = 0.0            # noise perturbation [Hyper-SD §3.1, offset noise]
    threads: int = 0

    def __post_init__(self):
        if not self.stages:
            raise UserError("a run needs at least one stage")
        for i, stage in enumerate(self.stages):
            _check_stage(i, stage, self.gradient_accumulation)
            if stage.start_from == "previous" and i == 0:
                stage.start_from = "base"
            stage.name = stage.name or f"{i}-{stage.method}-k{getattr(stage.config, 'segments', 1)}"
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise UserError("checkpoint_every and keep_checkpoints must be at least 1")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")


def _check_stage(i: int, stage: StageConfig, accumulation: int) -> None:
    """Known method, positive sizes, and the method's own fields checked against its config."""
    from hypersd.distill.protocol import methods
    registry = methods()
    if stage.method not in registry:
        raise UserError(f"stage {i}: unknown method {stage.method!r}; known: {', '.join(registry)}")
    if stage.steps < 1 or stage.batch_size < 1:
        raise UserError(f"stage {i}: steps and batch_size must be positive")
    if accumulation < 1 or stage.batch_size % accumulation:
        raise UserError(f"stage {i}: batch_size {stage.batch_size} must be a multiple of "
                        f"gradient_accumulation {accumulation} (the micro-batches are equal)")
    config_cls = registry[stage.method].config
    if stage.config is None or isinstance(stage.config, dict):
        stage.config = load_dataclass(config_cls, stage.config or {}, f"stage {i} ({stage.method})")
    elif not isinstance(stage.config, config_cls):
        raise UserError(f"stage {i}: method {stage.method} takes a {config_cls.__name__}, "
                        f"not a {type(stage.config).__name__}")


BUNDLED = Path(__file__).resolve().parents[1] / "recipes" / "distill"


def recipe_path(name: str) -> Path:
    """A YAML path, or the name of a bundled recipe (``hyper-sd-mini``)."""
    bundled = BUNDLED / f"{name}.yaml"
    return bundled if not Path(name).exists() and bundled.exists() else Path(name)


def load_run(name: str, overrides: list[str] = ()) -> RunConfig:
    """Read a run recipe (a YAML path or a bundled name), apply "key=value" overrides, check
    every field (the method's own fields against its config)."""
    data = apply_overrides(load_yaml(recipe_path(name)), list(overrides))
    for stage in data.get("stages") or []:
        if isinstance(stage, dict):  # a stage's flat fields: the loop's, then the method's
            extra = {k: stage.pop(k) for k in list(stage) if k not in _LOOP_FIELDS}
            if extra:
                stage["config"] = {**(stage.get("config") or {}), **extra}
    return load_dataclass(RunConfig, data, "recipe")
