"""A drawing as the scribble ControlNet takes it: white strokes on black at the model's size.

A drawing is dark strokes on a light canvas (the web page's sketchpad) or already white
strokes on black (``hypersd.controlnet.scribble``'s maps): the strokes are whatever the
background is not, and the background is the brighter or darker half of the picture. Its
strokes are averaged down to the model's resolution (an area average, so a stroke thinner
than a model pixel still counts) and kept where they cover enough of a pixel.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from hypersd.controlnet.scribble import as_control_image

STROKE = 0.3  # a model pixel is a stroke when strokes cover this share of it (a canvas 8x wider: 2-3 px)


def flatten(image: Image.Image) -> Image.Image:
    """RGB, a transparent background made white (a canvas exported with alpha)."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def stroke_map(drawing: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) in {0, 1}: the drawing's strokes at ``size`` (width, height)."""
    ink = np.asarray(flatten(drawing).convert("L"), dtype=np.float32) / 255
    if ink.mean() > 0.5:  # a light background: the strokes are the dark part
        ink = 1 - ink
    small = Image.fromarray(ink).resize(size, Image.Resampling.BOX)
    return torch.from_numpy((np.asarray(small) >= STROKE).astype(np.float32))[None, None]


def control_image(drawing: Image.Image | None, size: tuple[int, int]) -> Image.Image:
    """The ControlNet's input for ``drawing`` (None: no strokes), RGB at ``size``."""
    maps = torch.zeros(1, 1, size[1], size[0]) if drawing is None else stroke_map(drawing, size)
    pixels = (as_control_image(maps)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def editor_drawing(value) -> Image.Image | None:
    """The drawing in a sketchpad's value (its composite, else its background), or an image."""
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        composite = value.get("composite")
        return composite if composite is not None else value.get("background")
    raise TypeError(f"not a drawing: {type(value).__name__}")
