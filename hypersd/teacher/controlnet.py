"""The mini model's scribble ControlNet, trained on emoji32 (``train-teacher --phase controlnet``).

[ControlNet, Zhang et al. 2023: a trainable copy of the UNet's encoder and mid block reads
the control image through a small conditioning encoder; its outputs enter the frozen UNet
through zero-initialised convolutions, so training starts from the UNet unchanged.] The
UNet and VAE are the bundled mini teacher's; the control image of each training example is
its scribble (``hypersd.controlnet.scribble``), drawn anew with hand-drawn variation every
step; the loss is the teacher's own (ε, min-SNR weights, caption dropout for CFG).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from hypersd.controlnet.scribble import as_control_image, augment, scribble
from hypersd.io import atomic_path
from hypersd.models.mini import MINI_DIR
from hypersd.teacher.config import TeacherConfig
from hypersd.teacher.train import _UnetTask

CONTROLNET_DIR = MINI_DIR.parent / "mini-controlnet"
CONDITIONING_CHANNELS = (16, 32, 64)  # 32x32 control image -> the 8x8 latent grid (two halvings)


class ControlNetTask(_UnetTask):
    def __init__(self, cfg: TeacherConfig, run_dir: Path, device):
        super().__init__(cfg, run_dir, device, vae_dir=MINI_DIR / "vae")
        self.unet = UNet2DConditionModel.from_pretrained(MINI_DIR / "unet", use_safetensors=True,
                                                         torch_dtype=torch.float32)
        self.unet = self.unet.eval().requires_grad_(False).to(device)
        self.maps = scribble((self.images + 1) / 2).cpu()  # augmented on the CPU, as ``g`` draws
        self.model = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)

    def predict(self, model, zt, t, text, idx, g):
        cond = as_control_image(augment(self.maps[idx.cpu()], g)).to(zt)
        down, mid = model(zt, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        return self.unet(zt, t, text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


def export_controlnet(run_dir: str | Path, out_dir: str | Path = CONTROLNET_DIR) -> Path:
    """The trained ControlNet (its EMA weights) as a diffusers ControlNet folder in fp16."""
    net = ControlNetModel.from_pretrained(Path(run_dir) / "controlnet", use_safetensors=True)
    with atomic_path(out_dir) as tmp:
        net.to(torch.float16).save_pretrained(tmp)
    return Path(out_dir)
