"""Networks as named views of one UNet: teacher, student, EMA target and any extra role.

With a LoRA student every role but the teacher is a peft adapter on one UNet in memory: the
teacher is the base weights (adapters disabled), the student the trainable adapter
"student", the target its EMA "target" [Θ⁻ ← μΘ⁻ + (1-μ)Θ], and a method may add more
(a fake score, ...) with ``add_role``. With ``full_unet`` the student is the whole UNet and
every other role is a copy of it.

A role's calls go through the module accelerate prepared for it (``use_wrapped``) once there
is one, so DDP and FSDP see every forward that needs them. Under FSDP a wrapped module's
parameters are shards; reading, loading and averaging weights then happen inside
``summon_full_params`` (a collective: every process calls them).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from hypersd.errors import UserError


class _View:
    """Calls the UNet of one role (for LoRA roles: the shared UNet with that adapter active)."""

    def __init__(self, nets: "Networks", role: str):
        self.nets, self.role = nets, role

    def __call__(self, *args, **kwargs):
        nets = self.nets
        call = nets._callers.get(self.role if nets.lora is None else "shared")
        if nets.lora is None:
            return (call or nets._modules[self.role])(*args, **kwargs)
        nets.activate(None if self.role == "teacher" else self.role)
        return (call or nets.unet)(*args, **kwargs)


class Networks:
    def __init__(self, unet, lora: LoraConfig | None, feature_fn=None):
        from hypersd.distill.methods.adversarial import encoder_features
        self.unet = unet.requires_grad_(False)
        self.feature_fn = feature_fn or encoder_features  # (network, x, t, cond) -> feature maps
        self.lora = lora
        self._callers: dict[str, object] = {}
        self._layers: list[BaseTunerLayer] = []
        self._trainable: set[str] = {"student"}
        if lora is None:
            self._modules = {"teacher": copy.deepcopy(unet).eval(), "target": copy.deepcopy(unet).eval(),
                             "student": unet.train().requires_grad_(True)}
        else:
            self._modules = {}
            for role in ("student", "target"):
                self._add_adapter(role)
            self._set_requires_grad()
            self.copy_role("target", "student")
        self.teacher, self.student, self.target = (self.view(r) for r in ("teacher", "student", "target"))

    # ---- roles -------------------------------------------------------------------------
    def add_role(self, role: str, trainable: bool = False, like: str = "teacher") -> _View:
        """A new role that starts as a copy of ``like`` (for LoRA: an adapter with its weights)."""
        if role in self.roles():
            raise ValueError(f"role {role!r} exists already")
        if self.lora is None:
            self._modules[role] = copy.deepcopy(self._modules[like]).requires_grad_(trainable)
        else:
            self._add_adapter(role)
            if like == "teacher":  # an adapter with B = 0 adds nothing to the base weights
                self.load_state(role, {k: torch.zeros_like(v) if "lora_B" in k else v
                                       for k, v in self.state(role).items()})
            else:
                self.copy_role(role, like)
        if trainable:
            self._trainable.add(role)
        self._set_requires_grad()
        return self.view(role)

    def drop_role(self, role: str) -> None:
        """Remove a role a method added (its adapter or copy)."""
        if role in ("teacher", "student", "target"):
            raise ValueError(f"role {role!r} belongs to every stage")
        if self.lora is None:
            del self._modules[role]
            self._callers.pop(role, None)  # its accelerate wrapper goes with it
        else:
            with warnings.catch_warnings():  # peft names a new active adapter; activate() decides
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self.unet.delete_adapters(role)
            self._layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        self._trainable.discard(role)
        self._set_requires_grad()

    def _add_adapter(self, role: str) -> None:
        with warnings.catch_warnings():  # several adapters on one model are the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.unet.add_adapter(self.lora, adapter_name=role)
        self._layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]

    def activate(self, role: str | None) -> None:
        """Make ``role``'s adapter the active one (None: none, the base weights).

        peft's set_adapter / enable_adapters also switch requires_grad to the active adapter;
        which roles train is this class's decision (and DDP fixes it when it wraps the UNet),
        so only the layers' active-adapter flags are set here.
        """
        for layer in self._layers:
            layer._disable_adapters = role is None
            if role is not None:
                layer._active_adapter = [role]

    def roles(self) -> list[str]:
        if self.lora is None:
            return list(self._modules)
        return ["teacher", *self.unet.peft_config]

    def view(self, role: str) -> _View:
        return _View(self, role)

    def module(self, role: str) -> torch.nn.Module:
        """The module that holds ``role``'s weights (for LoRA: the one shared UNet)."""
        return self.unet if self.lora is not None else self._modules[role]

    def use_wrapped(self, role: str, wrapped) -> None:
        """Route ``role``'s calls (for LoRA: every role's) through accelerate's wrapper."""
        self._callers["shared" if self.lora is not None else role] = wrapped

    def trainable(self, role: str = "student") -> list[torch.nn.Parameter]:
        return [p for _, p in self._named(role)]

    def _named(self, role: str) -> list[tuple[str, torch.nn.Parameter]]:
        if self.lora is None:
            return list(self._modules[role].named_parameters())
        return [(n, p) for n, p in self.unet.named_parameters() if f".{role}." in n]

    def _set_requires_grad(self) -> None:
        if self.lora is None:
            for role, module in self._modules.items():
                module.requires_grad_(role in self._trainable)
            return
        for n, p in self.unet.named_parameters():
            p.requires_grad_(any(f".{role}." in n for role in self._trainable))

    # ---- weights -----------------------------------------------------------------------
    def _sharded(self, *roles: str) -> list:
        """The FSDP wrappers of ``roles`` (for LoRA: of the shared UNet)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        keys = {"shared"} if self.lora is not None else set(roles)
        return [m for k, m in self._callers.items() if k in keys and isinstance(m, FSDP)]

    def _full(self, *roles: str, writeback: bool = False):
        """Whole parameters of FSDP-wrapped roles for the duration of the block (else a no-op)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        sharded = self._sharded(*roles)
        if not sharded:
            return nullcontext()
        if len(sharded) > 1:
            raise NotImplementedError("one FSDP-wrapped role at a time")
        return FSDP.summon_full_params(sharded[0], writeback=writeback)

    @torch.no_grad()
    def copy_role(self, dst: str, src: str) -> None:
        with self._full(dst, src, writeback=True):
            for (_, d), (_, s) in zip(self._named(dst), self._named(src), strict=True):
                d.copy_(s)

    @torch.no_grad()
    def ema(self, dst: str, src: str, mu: float) -> None:
        """Θ_dst ← μ Θ_dst + (1 - μ) Θ_src."""
        with self._full(dst, src, writeback=True):
            for (_, d), (_, s) in zip(self._named(dst), self._named(src), strict=True):
                d.lerp_(s.detach(), 1 - mu)

    def update_target(self, mu: float) -> None:
        """The EMA target: Θ⁻ ← μΘ⁻ + (1 - μ)Θ."""
        self.ema("target", "student", mu)

    def state(self, role: str) -> dict[str, torch.Tensor]:
        """A role's weights: LoRA tensors (peft names) or the full UNet state dict."""
        with self._full(role):
            if self.lora is None:
                return {k: v.detach().clone() for k, v in self._modules[role].state_dict().items()}
            return {k: v.detach().clone()
                    for k, v in get_peft_model_state_dict(self.unet, adapter_name=role).items()}

    def load_state(self, role: str, state: dict) -> None:
        with self._full(role, writeback=True):
            if self.lora is None:
                self._modules[role].load_state_dict(state)
            else:
                set_peft_model_state_dict(self.unet, state, adapter_name=role)

    def load_states(self, student: dict, target: dict | None = None) -> None:
        """The student's weights, and the target's (default: the student's)."""
        self.load_state("student", student)
        self.load_state("target", target if target is not None else student)

    @torch.no_grad()
    def promote_student(self) -> None:
        """Make the student the teacher (the next stage distils it), keeping the student as is.

        LoRA: the student's ΔW is merged into the base weights and every adapter's B is set
        to zero, so student and target start the next stage equal to the new teacher.
        Full UNet: the teacher copy takes the student's weights.
        """
        if self.lora is None:
            self._modules["teacher"].load_state_dict(self._modules["student"].state_dict())
            return
        for module in self.unet.modules():
            if isinstance(module, BaseTunerLayer):
                _fold(module, "student")
        for role in self.roles()[1:]:
            self.load_state(role, {k: torch.zeros_like(v) if "lora_B" in k else v
                                   for k, v in self.state(role).items()})

    @torch.no_grad()
    def merged_unet(self, role: str) -> torch.nn.Module:
        """A standalone, frozen copy of ``role``'s UNet: for LoRA roles the base with the role's
        ΔW folded in and no adapters left (``teacher``: the base weights)."""
        if self.lora is None:
            return copy.deepcopy(self._modules[role]).requires_grad_(False)
        unet = copy.deepcopy(self.unet)
        for name, module in list(unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                base = _fold(module, role)
                parent, _, child = name.rpartition(".")
                setattr(unet.get_submodule(parent) if parent else unet, child, base)
        unet.peft_config, unet._hf_peft_config_loaded = {}, False
        return unet.requires_grad_(False)

    def file_state(self, path: str) -> dict[str, torch.Tensor]:
        """The student weights a LoRA file gives: its adapter tensors, or for a full UNet the
        base (the teacher's weights) with the file's ΔW merged in. Raises FileNotFoundError,
        or KeyError for a file whose modules this UNet lacks."""
        from safetensors.torch import load_file
        if not Path(path).exists():
            raise FileNotFoundError("no such LoRA file")
        state = {k.removeprefix("unet."): v for k, v in load_file(path).items()}
        if self.lora is None and any("lora_" in k for k in state):
            return merged_lora(self.state("teacher"), path)
        if self.lora is not None:  # B as this run's adapter scales it (exports fold alpha / r into B)
            ratio = _file_scale(path) * self.lora.r / self.lora.lora_alpha
            state = {k: v * ratio if ".lora_B." in k and ratio != 1 else v for k, v in state.items()}
        return state

    def teacher_features(self, x, t, cond) -> list[torch.Tensor]:
        """The frozen teacher's encoder features (the adversarial term's backbone)."""
        return self.features("teacher", x, t, cond)

    def features(self, role: str, x, t, cond) -> list[torch.Tensor]:
        """``role``'s features (``feature_fn``): a UNet's down blocks' and mid block's outputs, a
        transformer's image tokens after its blocks."""
        if self._sharded(role):
            raise UserError(f"encoder features are read from the {role}'s UNet blocks, which FSDP "
                            "shards here: use data parallelism (DDP) for adversarial and GAN terms")
        if self.lora is None:
            return self.feature_fn(self._modules[role], x, t, cond)
        self.activate(None if role == "teacher" else role)
        return self.feature_fn(self.unet, x, t, cond)


def _fold(layer: BaseTunerLayer, role: str) -> torch.nn.Module:
    """Add ``role``'s ΔW to the layer's base weights (none for the teacher); return the base layer."""
    base = layer.get_base_layer()
    if role != "teacher" and role in layer.lora_A:
        base.weight += layer.get_delta_weight(role).to(base.weight.dtype)
    return base


def merged_lora(weights: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """``weights`` (a UNet state dict) with the LoRA file's ΔW = scale · B A added."""
    from hypersd.lora.tools import read_lora
    lf, out = read_lora(path), dict(weights)
    for name, (a, b, _) in lf.modules.items():
        key = name.removeprefix("unet.") + ".weight"
        if key not in out:
            raise KeyError(f"LoRA module {name} matches no weight of this UNet")
        w = out[key]
        delta = lf.scale_of(name) * (b.flatten(1).double() @ a.flatten(1).double())
        out[key] = (w.double() + delta.view(w.shape)).to(w.dtype)
    return out


def _file_scale(path: str) -> float:
    """The alpha / r a diffusers LoRA file's peft metadata gives (1: none, as loaders read it)."""
    import json

    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        peft = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    alpha = next((v for k, v in peft.items() if k.endswith("lora_alpha")), None)
    rank = next((v for k, v in peft.items() if k.endswith(".r")), None)
    return 1.0 if alpha is None or not rank else float(alpha) / float(rank)
