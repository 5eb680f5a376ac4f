"""Typed configuration of teacher training (defaults are the bundled model's settings)."""

from __future__ import annotations

from dataclasses import dataclass

from hypersd.data.emoji32 import STYLES
from hypersd.errors import UserError

TEACHER_HANDOFF = "train-state/teacher-unet.safetensors"
FLOW_HANDOFF = "train-state/mini-flow.safetensors"
PHASES = ("vae", "unet", "controlnet", "flow")


@dataclass
class TeacherConfig:
    phase: str = "unet"              # "vae", "unet" (needs a trained VAE in run_dir/vae),
                                     # "controlnet" (the scribble ControlNet of the bundled model) or
                                     # "flow" (the mini flow model on the bundled teacher's VAE)
    run_dir: str = "runs/teacher"    # checkpoints, TensorBoard logs, trained parts
    data: str = "noto"               # the emoji32 style to train on (hypersd.data.emoji32.STYLES)
    init_from: str = ""              # unet phase: a diffusers pipeline folder, or "mini" (the bundled
                                     # teacher), whose UNet starts the run (a fine-tune) and whose VAE
                                     # it uses; "" = random init and run_dir's own trained VAE
    steps: int = 60_000              # total optimizer steps of this phase
    max_minutes: float = 0.0         # stop (after a checkpoint) when this wall time is spent; 0 = no limit
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.9995        # EMA of the UNet weights; the exported teacher is the EMA
    caption_dropout: float = 0.1     # share of captions replaced by "" so CFG works
    caption_mismatch: float = 0.0    # controlnet: share of captions replaced by another emoji's, so
                                     # the strokes, not the caption, decide the drawing when they disagree
    min_snr_gamma: float = 5.0       # min-SNR loss weighting [Hang et al. 2023]; 0 = plain MSE
    kl_weight: float = 1e-6          # VAE: weight of the KL term, as in SD's autoencoder
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    handoff: str = TEACHER_HANDOFF   # UNet weights + EMA kept in git between sessions: the
                                     # bundled teacher's own (noto, no init_from) only; the flow
                                     # phase's default is FLOW_HANDOFF
    threads: int = 0                 # torch CPU threads; 0 = torch's default
    max_images: int = 0              # train on the first N images only (smoke tests); 0 = all

    def __post_init__(self):
        if self.phase not in PHASES:
            raise UserError(f"phase must be one of {', '.join(PHASES)}; not {self.phase!r}")
        if self.phase == "flow" and self.handoff == TEACHER_HANDOFF:
            self.handoff = FLOW_HANDOFF  # the default: never the UNet teacher's file
        if self.steps <= 0 or self.batch_size <= 0:
            raise UserError("steps and batch_size must be positive")
        if self.data not in STYLES:
            raise UserError(f"data must be an emoji32 style, one of {', '.join(STYLES)}; not {self.data!r}")
        if not (0 <= self.caption_dropout and 0 <= self.caption_mismatch
                and self.caption_dropout + self.caption_mismatch <= 1):
            raise UserError("caption_dropout and caption_mismatch are shares of the batch: each 0 or more, "
                            "together at most 1")
        if self.caption_mismatch and self.phase != "controlnet":
            raise UserError("caption_mismatch teaches a ControlNet to follow its strokes over the caption; "
                            f"the {self.phase} phase does not take it")
        if self.init_from and self.phase != "unet":
            raise UserError(f"init_from starts the unet phase from a pipeline's UNet; the {self.phase} "
                            "phase does not take it")

    @property
    def uses_handoff(self) -> bool:
        """Whether the handoff is read and written: it keeps the bundled teacher's own training,
        so a fine-tune or a run on another style never touches it."""
        return bool(self.handoff) and not self.init_from and self.data == "noto"
