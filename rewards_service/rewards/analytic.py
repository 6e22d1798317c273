"""Two cheap, smooth analytic rewards for tests and demos (no weights, any image size)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import RewardError, RewardModel, check_kwargs
from .registry import register_reward


@register_reward("brightness")
class BrightnessReward(RewardModel):
    """log R = scale · mean pixel intensity (over channels and pixels, images in [0, 1])."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def log_reward(self, images, prompts=None):
        return self.scale * images.mean(dim=(1, 2, 3))

    @classmethod
    def from_config(cls, cfg, device=None):
        return cls(**check_kwargs(cfg.name, cfg.kwargs, ["scale"]))


@register_reward("color")
class ColorReward(RewardModel):
    """log R = −‖mean RGB − target‖² / (2 s²): a Gaussian bump around a target mean colour."""

    def __init__(self, target: Sequence[float] = (0.9, 0.1, 0.1), s: float = 0.25):
        super().__init__()
        if len(target) != 3:
            raise RewardError(f"color reward: target must have 3 values (RGB), got {list(target)}")
        if not s > 0:
            raise RewardError(f"color reward: s must be > 0, got {s}")
        self.register_buffer("target", torch.tensor([float(t) for t in target]), persistent=False)
        self.s = float(s)

    def log_reward(self, images, prompts=None):
        mean_rgb = images.mean(dim=(2, 3))
        diff = mean_rgb - self.target.to(images.dtype)
        return -(diff * diff).sum(dim=1) / (2 * self.s ** 2)

    @classmethod
    def from_config(cls, cfg, device=None):
        return cls(**check_kwargs(cfg.name, cfg.kwargs, ["target", "s"]))
