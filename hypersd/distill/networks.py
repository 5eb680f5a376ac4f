"""Student, EMA target and teacher as three views of one UNet with two LoRA adapters.

The teacher is the base weights (adapters disabled), the student the trainable adapter
"student", the target its EMA "target" [Θ⁻ ← μΘ⁻ + (1-μ)Θ]. One UNet in memory serves all
three. With ``full_unet`` the student is the whole UNet and teacher/target are copies.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict


class _View:
    """Calls the shared UNet with one adapter active (None: the base weights)."""

    def __init__(self, unet, adapter: str | None):
        self.unet, self.adapter = unet, adapter

    def __call__(self, *args, **kwargs):
        if self.adapter is None:
            self.unet.disable_adapters()
            try:
                return self.unet(*args, **kwargs)
            finally:
                self.unet.enable_adapters()
        self.unet.set_adapters([self.adapter])
        return self.unet(*args, **kwargs)


class Networks:
    def __init__(self, unet, lora: LoraConfig | None):
        self.unet = unet.requires_grad_(False)
        self.lora = lora
        if lora is None:
            self.teacher = copy.deepcopy(unet).eval()
            self.target = copy.deepcopy(unet).eval()
            self.student = unet.train().requires_grad_(True)
            self._pairs = list(zip(self.target.parameters(), self.student.parameters()))
            return
        unet.add_adapter(lora, adapter_name="student")
        unet.add_adapter(lora, adapter_name="target")
        named = dict(unet.named_parameters())
        self._pairs = [(named[n.replace(".student.", ".target.")], p)
                       for n, p in named.items() if ".student." in n]
        for n, p in named.items():
            p.requires_grad_(".student." in n)
        self.copy_to_target()
        self.teacher, self.student, self.target = _View(unet, None), _View(unet, "student"), _View(unet, "target")

    def teacher_features(self, x, t, cond) -> list[torch.Tensor]:
        """The frozen teacher's encoder features (the discriminator's backbone)."""
        from hypersd.distill.adversarial import encoder_features
        if self.lora is None:
            return encoder_features(self.teacher, x, t, cond)
        self.unet.disable_adapters()
        try:
            return encoder_features(self.unet, x, t, cond)
        finally:
            self.unet.enable_adapters()

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._pairs]

    @torch.no_grad()
    def copy_to_target(self) -> None:
        for t, s in self._pairs:
            t.copy_(s)

    @torch.no_grad()
    def update_target(self, mu: float) -> None:
        """Θ⁻ ← μΘ⁻ + (1 - μ)Θ."""
        for t, s in self._pairs:
            t.lerp_(s.detach(), 1 - mu)

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's weights: LoRA tensors (peft names) or the full UNet state dict."""
        if self.lora is None:
            return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.unet, adapter_name="student").items()}

    def target_state(self) -> dict[str, torch.Tensor]:
        if self.lora is None:
            return {k: v.detach().clone() for k, v in self.target.state_dict().items()}
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.unet, adapter_name="target").items()}

    def load_states(self, student: dict, target: dict | None = None) -> None:
        if self.lora is None:
            self.unet.load_state_dict(student)
            self.target.load_state_dict(target if target is not None else student)
            return
        set_peft_model_state_dict(self.unet, student, adapter_name="student")
        set_peft_model_state_dict(self.unet, target if target is not None else student, adapter_name="target")
