"""A distillation run as typed config: the base model, the LoRA, and a list of stages.

YAML files hold only what differs from these defaults (see ``hypersd/recipes/distill/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    method: str                          # a key of hypersd.distill.methods.METHODS
    steps: int                           # optimizer steps of this stage
    name: str = ""                       # default: "<index>-<method>-k<segments>"
    segments: int = 1                    # k (TSCD/PCM)
    lr: float = 1e-4
    batch_size: int = 32
    guidance: tuple[float, float] | None = (2.0, 4.0)  # teacher CFG range ω; None: teacher without CFG
    student_guidance: bool = False       # guide the student at ω too: it keeps CFG and negative prompts
    solver_points: int = 40              # the teacher's DDIM grid
    mse_weight: float = 1.0              # weight of the consistency distance
    adv_weight: float = 0.0              # weight of the adversarial term (0: none)
    adv_loss: str = "hinge"              # "hinge" or "nonsaturating"
    adv_conditional: bool = True         # discriminator sees (x_t, candidate); False: candidate only
    critic_lr: float = 1e-4              # the discriminator heads' learning rate
    ema_decay: float = 0.95              # μ of the target network
    start_from: str = "previous"         # "previous" stage, "base" (a fresh LoRA) or a LoRA file


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
    gradient_accumulation: int = 1
    checkpoint_every: int = 200
    log_every: int = 20
    seed: int = 0
    offset_noise: float = 0.0            # noise perturbation [Hyper-SD §3.1, offset noise]
    threads: int = 0

    def __post_init__(self):
        from hypersd.distill.methods import METHODS
        if not self.stages:
            raise UserError("a run needs at least one stage")
        for i, stage in enumerate(self.stages):
            if stage.method not in METHODS:
                raise UserError(f"stage {i}: unknown method {stage.method!r}; "
                                f"known: {', '.join(METHODS)}")
            if stage.steps < 1 or stage.batch_size < 1:
                raise UserError(f"stage {i}: steps and batch_size must be positive")
            if stage.student_guidance and stage.guidance is None:
                raise UserError(f"stage {i}: student_guidance needs a guidance range, e.g. [2, 4]")
            if stage.start_from == "previous" and i == 0:
                stage.start_from = "base"
            stage.name = stage.name or f"{i}-{stage.method}-k{stage.segments}"
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")


def load_run(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read a run recipe (YAML), apply "key=value" overrides, check every field."""
    return load_dataclass(RunConfig, apply_overrides(load_yaml(path), list(overrides)), "recipe")
