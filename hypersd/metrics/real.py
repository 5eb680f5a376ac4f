"""Real-model metrics behind one interface: CLIP score and the LAION aesthetic predictor.

Weights come from a local folder or a hub id when a metric is built, never at import time;
when they cannot be found the error says which weights are missing. Both metrics take PIL
images and prompts and return one score per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hypersd.errors import UserError
from hypersd.torchfile import load_weights

CLIP_B32 = "openai/clip-vit-base-patch32"   # Hyper-SD's CLIP score model (Hyper-SD §4.1)
CLIP_L14 = "openai/clip-vit-large-patch14"  # the aesthetic predictor's feature model
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _load(what: str, loader, source: str, **kwargs):
    """``loader(source, **kwargs)``; models pass ``use_safetensors=True``, so that a folder or
    hub id holding only a pickled ``pytorch_model.bin`` is refused rather than unpickled."""
    try:
        return loader(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - hub and file errors come in many types
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{what} weights not found at {source!r} ({type(e).__name__}: {reason}): "
                        "download them (as .safetensors) and pass the local folder") from e


def clip_pixels(images, size: int) -> torch.Tensor:
    """CLIP preprocessing: bicubic resize of the short side, centre crop, normalise."""
    out = []
    for img in images:
        img = img.convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                         resample=3)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        out.append(np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def clip_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP preprocessing of images in [-1, 1] (N, 3, H, W), differentiable: bicubic resize of
    the short side, centre crop, normalise (``clip_pixels`` for tensors, for rewards)."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def _embeds(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScore:
    """100 * max(cos(image, text), 0) with a CLIP model, per image (torchmetrics' definition)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer

    @classmethod
    def from_pretrained(cls, source: str = CLIP_B32) -> "ClipScore":
        from transformers import AutoTokenizer, CLIPModel
        return cls(_load("CLIP", CLIPModel.from_pretrained, source, use_safetensors=True),
                   _load("CLIP tokenizer", AutoTokenizer.from_pretrained, source))

    @property
    def size(self) -> int:
        return self.model.config.vision_config.image_size

    def cosine(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(image, prompt) of preprocessed pixels, differentiable in the pixels."""
        img = _embeds(self.model.get_image_features(pixel_values=pixels))
        ids = self.tokenizer(prompts, padding=True, truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings,
                             return_tensors="pt")
        with torch.no_grad():
            txt = _embeds(self.model.get_text_features(input_ids=ids.input_ids,
                                                       attention_mask=ids.attention_mask))
        return F.cosine_similarity(img, txt, dim=-1)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        return (100 * self.cosine(clip_pixels(images, self.size), prompts).clamp(min=0)).numpy()


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP, on L2-normalised CLIP ViT-L/14 embeddings.

    Layer names follow its published state dict (``layers.0`` ... ``layers.7``) so the
    original weights file loads as is.
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1),
                                    nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class AestheticScore:
    """LAION aesthetic score (about 1-10) of each image."""

    def __init__(self, clip_model, head: AestheticHead):
        self.model, self.head = clip_model.eval().requires_grad_(False), head.eval()

    @classmethod
    def from_pretrained(cls, head_path: str, clip: str = CLIP_L14) -> "AestheticScore":
        from transformers import CLIPModel
        if not Path(head_path).exists():
            raise UserError(f"aesthetic head weights {head_path!r} not found: download "
                            "sac+logos+ava1-l14-linearMSE.pth and pass its path")
        model = _load("CLIP", CLIPModel.from_pretrained, clip, use_safetensors=True)
        head = AestheticHead(model.config.projection_dim)
        head.load_state_dict(load_weights(head_path))
        return cls(model, head)

    @property
    def size(self) -> int:
        return self.model.config.vision_config.image_size

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """The score of preprocessed pixels, differentiable in the pixels."""
        img = _embeds(self.model.get_image_features(pixel_values=pixels))
        return self.head(F.normalize(img, dim=-1)).squeeze(-1)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str] | None = None) -> np.ndarray:
        return self.predict(clip_pixels(images, self.size)).numpy()
