"""A CLIP backbone from a LOCAL transformers dir, and its projected image / text embeddings.

Embeddings are computed as `visual_projection(vision_model(...).pooler_output)` (and the text
analogue), which is what `CLIPModel.get_image_features` returns in transformers 4 (a tensor) and 5
(an output object): written out here so both versions give a tensor.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .base import RewardError


def _require_dir(model_path: str | Path | None, what: str) -> Path:
    if model_path is None or str(model_path) == "":
        raise RewardError(f"{what}: no local CLIP dir given (set reward.model_path)")
    p = Path(model_path).expanduser()
    if not (p / "config.json").is_file():
        raise RewardError(f"{what}: not a local transformers model dir (no config.json): {p}")
    return p


def load_clip_vision(model_path: str | Path | None, what: str = "reward"):
    """CLIPVisionModelWithProjection (vision tower + projection only) from a CLIPModel dir.

    The vision config gets the top-level `projection_dim` (transformers does not carry it over, and
    its default 512 would mis-size the projection). Unused text weights are expected, not logged.
    """
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

    p = _require_dir(model_path, what)
    try:
        cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
        if isinstance(cfg, CLIPConfig):
            vision_cfg = cfg.vision_config
            vision_cfg.projection_dim = cfg.projection_dim
            cfg = vision_cfg
        with _quiet_transformers():
            model = CLIPVisionModelWithProjection.from_pretrained(str(p), config=cfg,
                                                                  local_files_only=True)
    except Exception as exc:
        raise RewardError(f"{what}: cannot load a CLIP vision tower from {p}: {exc}") from exc
    return model.float()


def load_clip(model_path: str | Path | None, what: str = "reward"):
    """(CLIPModel, tokenizer) from a local dir holding both."""
    from transformers import AutoTokenizer, CLIPModel

    p = _require_dir(model_path, what)
    try:
        model = CLIPModel.from_pretrained(str(p), local_files_only=True).float()
    except Exception as exc:
        raise RewardError(f"{what}: cannot load a CLIPModel from {p}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise RewardError(f"{what}: no usable tokenizer files in {p}: {exc}") from exc
    return model, tokenizer


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def vision_image_size(model) -> int:
    """The input resolution the vision tower was trained at (224 for ViT-L/14)."""
    cfg = model.config
    return int(getattr(cfg, "vision_config", cfg).image_size)


def projection_dim(model) -> int:
    return int(model.config.projection_dim)


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) image embeddings (B, projection_dim)."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Projected (not normalised) text embeddings (B, projection_dim)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)
