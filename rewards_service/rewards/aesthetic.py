"""LAION Aesthetic Score: CLIP ViT-L/14 image embedding (L2-normalised) -> the LAION MLP head.

The head is the improved-aesthetic-predictor MLP (christophschuhmann/improved-aesthetic-predictor,
as used by DDPO and Nabla-GFlowNet): Linear(768,1024) Dropout Linear(1024,128) Dropout
Linear(128,64) Dropout Linear(64,16) Linear(16,1), no activations; public checkpoint keys
`layers.{0,2,4,6,7}.{weight,bias}` (e.g. sac+logos+ava1-l14-linearMSE.pth). log R = the score.

Preprocessing: differentiable resize + center crop to the tower's size (224) + CLIP normalisation.
`antialias=True` (default) is closest to CLIP's PIL-based preprocessing the head was trained on;
`antialias=False` on square images reproduces the authors' `F.interpolate(..., (224, 224),
mode="bicubic")`. Any input size is accepted (resized, never an error).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .base import RewardError, RewardModel, check_kwargs
from .clip_backbone import image_embeds, load_clip_vision, projection_dim, vision_image_size
from .preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .registry import register_reward
from .weights import load_state_dict, require_file, strip_prefix


class LaionAestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP; forward maps (B, in_dim) -> (B,)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.in_dim = in_dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def load_laion_head(path: str | Path | None) -> LaionAestheticHead:
    """The head from a public-layout checkpoint (.pth / .safetensors; `layers.*`, optionally under
    `mlp.`, `model.` or `module.`, or inside a Lightning {'state_dict': ...})."""
    p = require_file(path, "aesthetic head")
    sd = strip_prefix(load_state_dict(p, "aesthetic head"), "layers.")
    if "layers.0.weight" not in sd:
        raise RewardError(f"aesthetic head: {p} has no `layers.0.weight` "
                          "(not the LAION MLP layout)")
    head = LaionAestheticHead(in_dim=sd["layers.0.weight"].shape[1])
    missing, unexpected = head.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RewardError(f"aesthetic head: {p} does not match the LAION MLP layout: "
                          f"missing {missing}, unexpected {unexpected}")
    return head


@register_reward("aesthetic")
class AestheticReward(RewardModel):
    """log R = head(normalise(CLIP image embedding)); prompts are ignored.

    `clip`: a CLIPModel or CLIPVisionModelWithProjection (already built, e.g. a tiny one in tests);
    `head`: a LaionAestheticHead whose in_dim equals the CLIP projection dim.
    """

    def __init__(self, clip, head: LaionAestheticHead, *, image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 antialias: bool = True):
        super().__init__()
        if projection_dim(clip) != head.in_dim:
            raise RewardError(f"aesthetic: CLIP projection dim {projection_dim(clip)} != "
                              f"head input dim {head.in_dim}")
        self.clip, self.head = clip, head
        self.image_size = int(image_size or vision_image_size(clip))
        self.mean, self.std, self.antialias = tuple(mean), tuple(std), bool(antialias)
        self.freeze()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (B, D)."""
        dtype = next(self.clip.parameters()).dtype
        x = clip_preprocess(images.to(dtype), self.image_size, self.mean, self.std, self.antialias)
        e = image_embeds(self.clip, x)
        return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)

    def log_reward(self, images, prompts=None):
        return self.head(self.embed(images))

    @classmethod
    def from_config(cls, cfg, device=None):
        kw = check_kwargs(cfg.name, cfg.kwargs, ["image_size", "mean", "std", "antialias"])
        head = load_laion_head(cfg.weights_path)  # checked first: cheap, and names the file
        return cls(load_clip_vision(cfg.model_path, "aesthetic"), head, **kw)
