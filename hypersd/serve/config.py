"""What ``hypersd serve`` runs and the caps it holds every request to."""

from __future__ import annotations

from dataclasses import dataclass

from hypersd.errors import UserError
from hypersd.generate.speedup import SPEEDUPS

LOOPBACK = "127.0.0.1"


@dataclass
class ServeConfig:
    model: str | None = None        # "mini" (default), a diffusers folder, a hub id or a .safetensors file
    lora: str | None = None         # the accelerator, PATH[:SCALE]; None: the bundled one on the mini
                                    # model, none elsewhere; "none": serve without one
    recipe: str | None = None       # default: the one the LoRA was made for (hyper-sd-unified)
    controlnet: str | None = None   # the scribble tab's ControlNet; None: the bundled mini-controlnet
    host: str = LOOPBACK            # "0.0.0.0" opens the demo to the network
    port: int = 7860
    speedup: str = "trace"          # trace | compile | none (hypersd.generate.speedup)
    threads: int = 0                # torch's CPU threads, 0: torch's default
    teacher_steps: int = 25         # the side-by-side teacher's DDIM steps (with CFG)
    max_steps: int = 8              # caps on each request...
    max_batch: int = 4              # images per request
    max_size: int = 0               # image side in pixels; 0: twice the model's own
    max_prompt: int = 200           # characters
    max_drawing: int = 2048         # side of a drawing sent to /scribble, in pixels
    queue_size: int = 64            # requests waiting at once; one more is told the queue is full

    def __post_init__(self):
        if self.speedup not in SPEEDUPS:
            raise UserError(f"--speedup {self.speedup!r}: use one of {', '.join(SPEEDUPS)}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: use a port from 1 to 65535 (0: any free one)")
        for name in ("teacher_steps", "max_steps", "max_batch", "max_prompt", "max_drawing", "queue_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: give 1 or more")
        if self.max_size < 0 or self.threads < 0:
            raise UserError("--max-size and --threads take 0 (the default) or more")
