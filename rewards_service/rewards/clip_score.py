"""CLIP text–image similarity: log R = scale · cos(image embedding, prompt embedding).

Differentiable with respect to the images; text embeddings carry no gradient and are cached per
prompt string. Any input size is accepted (resize + center crop to the tower's size).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import RewardModel, check_kwargs
from .clip_backbone import image_embeds, load_clip, text_embeds, vision_image_size
from .preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .registry import register_reward


@register_reward("clip_score")
class ClipScoreReward(RewardModel):
    """`clip`: a CLIPModel; `tokenizer`: its (CLIP) tokenizer, called as tokenizer(list, ...)."""

    needs_prompts = True

    def __init__(self, clip, tokenizer, *, scale: float = 1.0, image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 antialias: bool = True, max_length: int | None = None, cache_size: int = 4096):
        super().__init__()
        self.clip, self.tokenizer = clip, tokenizer
        self.scale = float(scale)
        self.image_size = int(image_size or vision_image_size(clip))
        self.mean, self.std, self.antialias = tuple(mean), tuple(std), bool(antialias)
        self.max_length = int(max_length or clip.config.text_config.max_position_embeddings)
        self.cache_size = int(cache_size)
        self._cache: dict[str, torch.Tensor] = {}
        self.freeze()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised prompt embeddings (B, D), cached per string."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            tok = self.tokenizer(todo, padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            device = next(self.clip.parameters()).device
            e = text_embeds(self.clip, tok["input_ids"].to(device),
                            tok["attention_mask"].to(device))
            e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)
            if len(self._cache) + len(todo) > self.cache_size:
                self._cache.clear()
            self._cache.update(zip(todo, e))
        return torch.stack([self._cache[p] for p in prompts])

    def log_reward(self, images, prompts=None):
        dtype = next(self.clip.parameters()).dtype
        x = clip_preprocess(images.to(dtype), self.image_size, self.mean, self.std, self.antialias)
        img = image_embeds(self.clip, x)
        img = img / torch.linalg.vector_norm(img, dim=-1, keepdim=True)
        txt = self.text_features(list(prompts)).to(img)
        return self.scale * (img * txt).sum(dim=-1)

    @classmethod
    def from_config(cls, cfg, device=None):
        kw = check_kwargs(cfg.name, cfg.kwargs, ["scale", "image_size", "mean", "std", "antialias",
                                                 "max_length", "cache_size"])
        clip, tokenizer = load_clip(cfg.model_path, "clip_score")
        return cls(clip, tokenizer, **kw)
