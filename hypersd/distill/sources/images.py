"""An image as a training example: read, made RGB, resized (shorter side) and cropped square.

SDXL conditions on each image's size and crop [Podell et al. 2023, §2.2 "micro-conditioning"]:
``fit`` returns them as the six time ids SDXL takes, (original height, original width, crop
top, crop left, target height, target width), the crop measured in the resized image as in
diffusers' SDXL training example.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypersd.errors import UserError
from hypersd.serve.canvas import flatten

READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises


def open_image(data, where: str) -> Image.Image:
    """A decoded image from a path, bytes, a PIL image or a datasets' ``{"bytes", "path"}`` cell."""
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path")
    if isinstance(data, Image.Image):
        return data
    if data is None:
        raise UserError(f"{where}: no image")
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else Path(data))
        image.load()
    except FileNotFoundError:
        raise UserError(f"{where}: image {data} does not exist") from None
    except READ_ERRORS as e:
        raise UserError(f"{where}: cannot read the image ({str(e).splitlines()[0][:120]})") from None
    return image


def crop_box(width: int, height: int, size: int, crop: str, key: str) -> tuple[int, int]:
    """(top, left) of the ``size`` square in a (width, height) image: centred, or random with a
    generator seeded by the example's name (the same crop on every build of the cache)."""
    if crop == "center":
        return (height - size) // 2, (width - size) // 2
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    return rng.randint(0, height - size), rng.randint(0, width - size)


def fit(image: Image.Image, size: int, crop: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, size, size) uint8 pixels and the SDXL time ids (6,) of ``image``: RGB (transparency
    on white), the shorter side resized to ``size`` (bicubic), then a ``size`` square cropped."""
    image = flatten(image)
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    top, left = crop_box(*resized, size, crop, key)
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels, torch.tensor([height, width, top, left, size, size], dtype=torch.float32)
