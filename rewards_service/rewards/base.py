"""The reward interface: `forward(images, prompts) -> log_r`, and the error every reward raises.

Convention: images are float (B, 3, H, W) in [0, 1]; the result is log R per image, shape (B,),
differentiable with respect to the images. Score-type models (Aesthetic, HPSv2, ImageReward,
CLIP similarity) return their score as log R (R = exp(score)); β is applied elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RewardError(RuntimeError):
    """A reward cannot be built or evaluated (missing weights, missing package, bad input)."""


class RewardModel(nn.Module):
    """Base class of rewards. Subclasses implement `log_reward`; weights are frozen, eval mode.

    Class attributes: `needs_prompts` (False for prompt-independent rewards, so the flow network's
    text conditioning can be zeroed).
    """

    needs_prompts: bool = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_images(images)
        if self.needs_prompts:
            if prompts is None or len(prompts) != images.shape[0]:
                n = None if prompts is None else len(prompts)
                raise RewardError(f"{type(self).__name__} needs one prompt per image: "
                                  f"{images.shape[0]} images, prompts {n}")
        log_r = self.log_reward(images, prompts)
        if log_r.shape != (images.shape[0],):
            raise RewardError(f"{type(self).__name__} returned shape {tuple(log_r.shape)}, "
                              f"expected ({images.shape[0]},)")
        return log_r

    def log_reward(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """log R per image (B,); every reward class defines it (this base has no reward of its own)."""
        raise TypeError(f"{type(self).__name__} must define log_reward(images, prompts)")

    def freeze(self) -> "RewardModel":
        """Eval mode (no dropout) and no parameter gradients; returns self."""
        self.eval()
        self.requires_grad_(False)
        return self


def check_images(images: torch.Tensor) -> None:
    """Raise RewardError unless `images` is a floating (B, 3, H, W) tensor."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        dtype = f" {images.dtype}" if isinstance(images, torch.Tensor) else ""
        raise RewardError(f"images must be a floating tensor, got {type(images).__name__}{dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")


def check_kwargs(reward: str, kwargs: dict, allowed: Sequence[str]) -> dict:
    """Raise RewardError naming unknown `reward.kwargs` keys; returns `kwargs` as a dict."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise RewardError(f"reward {reward!r}: unknown kwargs {unknown}; "
                          f"accepted: {sorted(allowed)}")
    return dict(kwargs)
