"""Image tensors: uint8 pixels to the [-1, 1] range the VAE and the metrics take."""

from __future__ import annotations

import numpy as np
import torch


def to_signed_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
