"""Scribbles of emoji: white strokes on black, as SD1.5's scribble ControlNets take them.

``scribble`` draws an image's strokes from its pixels alone (so the same function reads
them back from a generated image): the outline of the foreground (whatever is not the white
background) and the strong edges inside it (Sobel on luminance). ``augment`` makes them look
hand-drawn for training: strokes thickened or thinned, partly erased, shifted a pixel.
``edge_f1`` is the control fidelity: how well two stroke maps agree, within a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKGROUND = 0.92     # a pixel is background when all its channels are above this (white)
EDGE = 0.35           # Sobel magnitude (on [0, 1] luminance) that counts as a stroke inside


def _dilate(m: torch.Tensor, radius: int = 1) -> torch.Tensor:
    return F.max_pool2d(m, 2 * radius + 1, 1, radius) if radius > 0 else m


def _erode(m: torch.Tensor, radius: int = 1) -> torch.Tensor:
    return 1 - _dilate(1 - m, radius)


def scribble(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> (N, 1, H, W) stroke maps in {0, 1}."""
    fg = (images.amin(dim=1, keepdim=True) < BACKGROUND).float()
    outline = fg - _erode(fg)
    luma = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kx = images.new_tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3) / 4
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    mag = torch.sqrt(F.conv2d(padded, kx) ** 2 + F.conv2d(padded, kx.transpose(2, 3)) ** 2)
    inner = (mag > EDGE).float() * _erode(fg)
    return torch.clamp(outline + inner, 0, 1)


def augment(maps: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Hand-drawn variation of (N, 1, H, W) stroke maps: per map a random stroke width (thin,
    as drawn, or one pixel wider), up to 30% of the strokes erased in 3x3 patches, and a
    shift of up to one pixel."""
    n = maps.shape[0]
    wide = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    out = torch.where(wide, _dilate(maps), maps)
    centres = (torch.rand(n, 1, *maps.shape[2:], generator=g) < torch.rand(n, 1, 1, 1, generator=g) * 0.035)
    out = out * (1 - _dilate(centres.float()))  # erase 3x3 patches, as gaps in a stroke
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(out, shifts=(dy, dx), dims=(2, 3))


def as_control_image(maps: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 3, H, W) in [0, 1]: what a ControlNet pipeline feeds the network."""
    return maps.expand(-1, 3, -1, -1)


def edge_f1(wanted: torch.Tensor, got: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """Per-image F1 of two (N, 1, H, W) stroke maps: precision = share of ``got``'s stroke
    pixels within ``tolerance`` pixels of a ``wanted`` stroke, recall the converse. An image
    with no strokes in either map scores 1."""
    near_wanted, near_got = _dilate(wanted, tolerance), _dilate(got, tolerance)
    dims = (1, 2, 3)
    precision = (got * near_wanted).sum(dims) / got.sum(dims).clamp(min=1)
    recall = (wanted * near_got).sum(dims) / wanted.sum(dims).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-8)
    empty = (wanted.sum(dims) == 0) & (got.sum(dims) == 0)
    return torch.where(empty, torch.ones_like(f1), f1)
