"""Differentiable CLIP-style image preprocessing in torch only (no torchvision).

`clip_preprocess` = resize (bicubic, optionally antialiased, as `F.interpolate` computes it; both
are differentiable) + center crop (CLIP, ImageReward) or pad (HPSv2's ResizeMaxSize) to a square
+ per-channel normalisation. Sizes and crop offsets follow torchvision's `Resize(int)` and
`CenterCrop` rules, so a float image goes through the same arithmetic as the reference pipelines.
Values are not clamped after the bicubic resize (overshoot is kept, as torchvision does for floats).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(size)`: short side -> `size`, long side -> int(size * long / short)."""
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    return (size, new_long) if h <= w else (new_long, size)


def longest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """HPSv2 `ResizeMaxSize(size)`: the long side becomes `size`, the other round(dim*scale)."""
    scale = size / float(max(h, w))
    return round(h * scale), round(w * scale)


def resize(images: torch.Tensor, hw: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bicubic resize of (B, C, H, W) to `hw` (identity when the size already matches)."""
    if tuple(images.shape[-2:]) == tuple(hw):
        return images
    return F.interpolate(images, size=hw, mode="bicubic", align_corners=False, antialias=antialias)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision `CenterCrop(size)` offsets: top = int(round((H - size) / 2))."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {h}x{w} to {size}x{size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def pad_to_square(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Pad (left/top get the floor half) to size x size, like HPSv2's ResizeMaxSize."""
    h, w = images.shape[-2:]
    ph, pw = size - h, size - w
    if ph == 0 and pw == 0:
        return images
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD, antialias: bool = True,
                    mode: Literal["crop", "pad"] = "crop") -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> normalised (B, 3, size, size) model input.

    mode "crop": resize the shortest side to `size`, center crop (CLIP / ImageReward).
    mode "pad": resize the longest side to `size`, pad with 0 (black) (HPSv2).
    Square inputs give the same result in both modes: a plain resize to size x size.
    """
    h, w = images.shape[-2:]
    if mode == "crop":
        x = center_crop(resize(images, shortest_side_size(h, w, size), antialias), size)
    elif mode == "pad":
        x = pad_to_square(resize(images, longest_side_size(h, w, size), antialias), size)
    else:
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    return normalize(x, mean, std)
