"""LoRA files: diffusers/peft format and kohya format (what ComfyUI and A1111 load)."""

from hypersd.lora.formats import KOHYA_PREFIXES, to_kohya

__all__ = ["KOHYA_PREFIXES", "to_kohya"]
