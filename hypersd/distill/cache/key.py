"""What a cache entry was made from, hashed into its folder's name.

An entry holds latents and conditioning that depend on the VAE, the text encoders and
tokenizers, the data's content, the resolution and the crop; every one of them is in the key,
so a changed VAE or caption never reads another's entries. A network is identified by its
class, its config and its weights: each tensor's name, shape and dtype and up to
``VALUES_PER_TENSOR`` of its values, evenly strided (all of them for the small tensors; a
fine-tune changes them throughout, and hashing a 10 GB text encoder whole would take longer
than the check is worth).
"""

from __future__ import annotations

import hashlib
import json

import torch

FORMAT = 1                     # bump when what an entry holds, or how it is computed, changes
VALUES_PER_TENSOR = 1 << 18


def fingerprint(module: torch.nn.Module | None) -> str | None:
    """A hash of a network's class, config and weights."""
    if module is None:
        return None
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(json.dumps(_config(module), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        values = flat[::max(1, flat.numel() // VALUES_PER_TENSOR)].cpu().contiguous()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(values.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config(module) -> dict:
    """A diffusers or transformers config as a dict, less where it was loaded from and by which version."""
    config = getattr(module, "config", None)
    if config is None:
        return {}
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def tokenizer_identity(tokenizer) -> list | None:
    if tokenizer is None:
        return None
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    return [type(tokenizer).__name__, tokenizer.model_max_length, hashlib.sha256(vocab).hexdigest()]


def key_parts(pipe, family, source_identity: dict, settings) -> dict:
    """Everything an entry depends on (``settings``: the run's ``DataSettings``)."""
    text = {name: fingerprint(getattr(pipe, name, None))
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    tokens = {name: tokenizer_identity(getattr(pipe, name, None))
              for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    return {"format": FORMAT, "family": family.name, "resolution": family.resolution,
            "max_sequence_length": family.max_sequence_length, "crop": settings.crop,
            "shard_size": settings.shard_size, "vae": fingerprint(pipe.vae), "text_encoders": text,
            "tokenizers": tokens, "force_zeros_for_empty_prompt":
            bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)), "data": source_identity}


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
