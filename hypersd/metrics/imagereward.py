"""ImageReward: a human-preference reward of an image for its prompt [Xu et al. 2023].

A BLIP ViT encodes the image; BLIP's BERT text encoder reads the prompt while cross-attending
to the image tokens; an MLP maps the first token's state to a reward, standardised with the
mean and spread the authors measured on their data. We run it on transformers' BLIP
(``BlipForImageTextRetrieval``) and read the published ``ImageReward.pt`` through
:func:`convert_checkpoint`, which renames its keys to that layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hypersd.errors import UserError
from hypersd.metrics.real import AestheticHead, _load, clip_pixels
from hypersd.torchfile import load_weights

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # the published standardisation
MAX_TOKENS = 35

# ImageReward.pt's BLIP vision names -> transformers' ("#" is a block index); the text
# encoder's names already agree. One table serves both directions.
_VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.#.norm1.", "encoder.layers.#.layer_norm1."),
    ("blocks.#.norm2.", "encoder.layers.#.layer_norm2."),
    ("blocks.#.attn.qkv.", "encoder.layers.#.self_attn.qkv."),
    ("blocks.#.attn.proj.", "encoder.layers.#.self_attn.projection."),
    ("blocks.#.mlp.", "encoder.layers.#.mlp."),
    ("norm.", "post_layernorm."),
]


def _rename(name: str, reverse: bool = False) -> str | None:
    """``name`` under the other side's names, or None when the table has no entry for it."""
    for src, dst in _VISION_NAMES:
        src, dst = (dst, src) if reverse else (src, dst)
        pattern = "^" + r"(\d+)".join(map(re.escape, src.split("#"))) + ("" if src.endswith(".") else "$")
        m = re.match(pattern, name)
        if m:
            return dst.replace("#", m.group(1) if m.groups() else "") + name[m.end():]
    return None


def convert_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split the published state dict into (BLIP weights in transformers' names, MLP head)."""
    blip, head = {}, {}
    for key, value in state.items():
        if key.startswith("mlp."):
            head[key[len("mlp."):]] = value
        elif key.startswith("blip.visual_encoder."):
            name = _rename(key[len("blip.visual_encoder."):])
            if name is None:
                raise UserError(f"unexpected ImageReward vision key {key!r}")
            blip[f"vision_model.{name}"] = value
        elif key.startswith("blip.text_encoder."):
            blip[key[len("blip."):]] = value
    if not blip or not head:
        raise UserError("not an ImageReward checkpoint: expected 'blip.*' and 'mlp.*' keys")
    return blip, head


class ImageReward:
    """Reward per (image, prompt); higher is preferred. About N(0, 1) over the authors' data."""

    def __init__(self, blip, tokenizer, head: AestheticHead):
        self.blip, self.tokenizer = blip.eval().requires_grad_(False), tokenizer
        self.head = head.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, checkpoint: str, blip: str = "Salesforce/blip-itm-large-coco"
                        ) -> "ImageReward":
        """``checkpoint``: the published ``ImageReward.pt`` or a ``.safetensors`` conversion of
        it, read without unpickling; ``blip``: a transformers BLIP retrieval model of the same
        shape (ViT-L, 224 px), from a folder or hub id, whose config and tokenizer are used and
        whose weights are replaced."""
        from transformers import AutoTokenizer, BlipForImageTextRetrieval
        if not Path(checkpoint).is_file():
            raise UserError(f"ImageReward weights {checkpoint!r} not found: download "
                            "ImageReward.pt (hub: THUDM/ImageReward) and pass its path")
        model = _load("BLIP", BlipForImageTextRetrieval.from_pretrained, blip, use_safetensors=True)
        tokenizer = _load("BLIP tokenizer", AutoTokenizer.from_pretrained, blip)
        weights, head_state = convert_checkpoint(load_weights(checkpoint))
        missing, _ = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k.startswith(("vision_model.", "text_encoder."))
                   and not k.endswith("position_ids")]
        if missing:
            raise UserError(f"{checkpoint} does not fit the BLIP model {blip!r}: "
                            f"{len(missing)} weights missing, e.g. {missing[:2]}")
        head = AestheticHead(model.config.text_config.hidden_size)
        head.load_state_dict(head_state)
        return cls(model, tokenizer, head)

    @property
    def size(self) -> int:
        return self.blip.config.vision_config.image_size

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        return self.reward(clip_pixels(images, self.size), prompts).numpy()

    def reward(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The standardised reward of preprocessed pixels, differentiable in the pixels."""
        image_tokens = self.blip.vision_model(pixel_values=pixels).last_hidden_state
        ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=MAX_TOKENS, return_tensors="pt")
        text = self.blip.text_encoder(
            input_ids=ids.input_ids, attention_mask=ids.attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))
        reward = self.head(text.last_hidden_state[:, 0]).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def published_layout(model: nn.Module, head: AestheticHead) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_checkpoint`: our modules' weights under the published
    names (for tests, and to write a checkpoint other ImageReward code reads)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_model."):
            out[f"blip.visual_encoder.{_rename(key[len('vision_model.'):], reverse=True)}"] = value
        elif key.startswith("text_encoder."):
            out[f"blip.{key}"] = value
    out.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    return out
