"""What a distillation method is to the loop, and the registry of methods.

A method owns its networks' roles, its phases and each phase's loss; the loop owns
optimisation (one optimizer per phase), precision, gradient accumulation, data, checkpoints,
logging and export. A step of a stage is:

    example = method.sample(batch, g)          # every random draw of the step, batch-first
    for phase in method.phases(step):          # e.g. ["student", "critic"]
        for micro in split(example, N):        # gradient accumulation over N micro-batches
            loss, logs = method.loss(phase, micro)
            backward, clip, step the phase's optimizer (once per N)
        method.after_step(phase)               # e.g. the EMA target update

A method is a class with this interface, registered in one line next to its config class:

    register("tscd", TSCDConfig, ConsistencyMethod)

Its config class is a dataclass of the method's own fields; a recipe stage's fields that are
not the loop's (``StageConfig``) are checked against it when the recipe is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hypersd.distill.data import Batch
from hypersd.distill.denoiser import Denoiser, unet_call
from hypersd.distill.process import VP, Process
from hypersd.distill.networks import Networks


@dataclass
class StageContext:
    """What a method is built with: the networks and the run-level settings it may use."""

    nets: Networks
    process: Process                   # the base model's forward process (VP: its ᾱ; Flow: its shift)
    prediction_type: str               # "epsilon" | "v_prediction" | "sample" | "flow"
    offset_noise: float = 0.0          # noise perturbation [Hyper-SD §3.1, offset noise]
    probe: Batch | None = None         # two examples, for shape-dependent set-up (critic heads)
    data: Any = None                   # the run's examples (``Prompts``), for methods that precompute
    vae: Any = None                    # the base model's VAE, for methods that score decoded images
    finished: dict[str, Path] = field(default_factory=dict)  # checkpoints of the run's finished
                                       # stages by name, in order (a progressive stage's teacher)
    call: Callable = unet_call         # the network's call convention (``flux_call`` for FLUX)
    latent_shape: tuple[int, ...] = (4, 8, 8)  # one example's x₀, for methods that start from noise

    def __post_init__(self):
        if not isinstance(self.process, Process):  # the ᾱ of a VP schedule
            self.process = VP(self.process)

    def denoiser(self, role: str, prediction_type: str | None = None) -> Denoiser:
        """The role's network as a denoiser of the base model's process."""
        return Denoiser(self.nets.view(role), self.process, prediction_type or self.prediction_type, self.call)


class Method:
    """Base class of the distillation methods; subclasses override what they need."""

    needs_images = True                # False: trains from prompts alone
    unused_parameters = False          # True: a phase leaves some trainable parameters without a
                                       # gradient (two trainable roles on one module), which DDP
                                       # must then look for (``find_unused_parameters``)

    def __init__(self, cfg, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx

    def phases(self, step: int) -> list[str]:
        """The phases of optimizer step ``step``, in order (each its own optimizer)."""
        return ["student"]

    def params(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable parameters of each phase."""
        return {"student": self.ctx.nets.trainable("student")}

    def modules(self) -> dict[str, torch.nn.Module]:
        """The module each phase trains, for accelerate to wrap (DDP, FSDP)."""
        return {"student": self.ctx.nets.module("student")}

    def wrapped(self, phase: str, module) -> None:
        """Receives the module of ``phase`` as accelerate prepared it; calls must go through it."""
        if phase == "student":
            self.ctx.nets.use_wrapped("student", module)

    def optimizer_settings(self, lr: float) -> dict[str, dict]:
        """Each phase's AdamW keyword arguments; ``lr`` is the stage's (the student's)."""
        return {"student": {"lr": lr}}

    def sample(self, batch: Batch, g: torch.Generator):
        """All random draws of one step, as a batch-first dataclass the loop may slice."""
        raise NotImplementedError

    def loss(self, phase: str, example) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of ``phase`` on (a micro-batch of) ``example``, and logs."""
        raise NotImplementedError

    def after_step(self, phase: str) -> None:
        """Called after the optimizer step of ``phase`` (EMA updates and the like)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold, besides the student (the loop's), to resume exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Called when the stage ends: remove the roles the method added."""

    def export_info(self) -> dict[str, Any]:
        """The inference recipe that serves the student and the step counts it serves."""
        raise NotImplementedError

    def passes(self, example) -> dict[str, Callable[[], None]]:
        """Each network pass of a step on ``example``, runnable alone (``hypersd bench train-cost``)."""
        return {}


def no_grad_pass(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` run without gradient: a pass for ``Method.passes``."""
    def run():
        with torch.no_grad():
            fn()
    return run


def clear_grads(params) -> None:
    """Drop the gradients a timed backward pass left (``Method.passes``)."""
    for p in params:
        p.grad = None


@dataclass(frozen=True)
class Registered:
    config: type
    method: type


METHODS: dict[str, Registered] = {}


def register(name: str, config: type, method: type) -> None:
    """Make ``name`` usable as a stage's ``method``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{name}: the config class must be a dataclass")
    METHODS[name] = Registered(config, method)


def methods() -> dict[str, Registered]:
    """The registry, with every bundled method module imported."""
    importlib.import_module("hypersd.distill.methods")  # each module there registers its methods
    return METHODS
