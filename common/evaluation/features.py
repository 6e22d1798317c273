"""Image feature extractors for diversity and prior drift, behind a name → factory registry.

An extractor maps images (B, 3, H, W) in [0, 1] (what `decode_latents` gives; 1-channel images are
repeated to 3) to features (B, D) float32, with no gradients. Names:

- `clip`: CLIP image embeddings, `visual_projection(vision_model(x).pooler_output)`, of a
  transformers CLIPModel (or CLIPVisionModelWithProjection) in a LOCAL dir (`model_path`; loaded
  by rewards_service/rewards/clip_backbone.py), input resized to the tower's size, centre-cropped
  and CLIP-normalised (rewards_service/rewards/preprocess.py). Unnormalised (FID-style); diversity's
  cosine distance normalises them itself.
- `dreamsim`: DreamSim's embedding (`dreamsim.dreamsim(pretrained=True, cache_dir=model_path)`,
  `model.embed` of a 224×224 bicubic resize, as its own preprocess does). DreamSim is an optional
  extra, not a dependency: it needs torchvision and downloads its weights on first use.
- `auto`: `dreamsim` when the package imports, else `clip`.
- anything else: a dotted path `package.module:callable`, or a name registered with
  `register_features`; the callable is a factory `f(model_path, device) -> extractor`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nablagfn.common.dotted import load_dotted


class FeatureError(ValueError):
    """A feature extractor is unknown, cannot be built (names what is missing), or misbehaves."""


_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_features(name: str) -> Callable[[Any], Any]:
    """Decorator: register a factory `f(model_path, device) -> extractor` under `name`."""

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise FeatureError(f"feature extractor {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def known_features() -> list[str]:
    return sorted(set(_REGISTRY) | {"auto"})


def dreamsim_available() -> bool:
    """Whether `import dreamsim` works here (it fails without a working torchvision)."""
    try:
        importlib.import_module("dreamsim")
    except Exception:  # ImportError, or torchvision's operator errors at import time
        return False
    return True


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise FeatureError(f"images must be a floating (B, C, H, W) tensor, got "
                           f"{getattr(images, 'shape', type(images).__name__)}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise FeatureError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    return images


class ClipImageFeatures(nn.Module):
    """Projected CLIP image embeddings (B, projection_dim) of images in [0, 1]."""

    name = "clip"

    def __init__(self, clip, image_size: int | None = None):
        from nablagfn.rewards_service.rewards.clip_backbone import vision_image_size

        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.image_size = int(image_size or vision_image_size(clip))

    @classmethod
    def from_dir(cls, model_path, device="cpu") -> "ClipImageFeatures":
        from nablagfn.rewards_service.rewards import RewardError
        from nablagfn.rewards_service.rewards.clip_backbone import load_clip_vision

        if not model_path:
            raise FeatureError("features=clip needs a local CLIP dir: set features_model_path "
                               "(`nablagfn eval --features-model DIR`; a CLIPModel save_pretrained dir)")
        try:
            model = load_clip_vision(model_path, what="features=clip")
        except RewardError as exc:
            raise FeatureError(str(exc)) from None
        return cls(model).to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from nablagfn.rewards_service.rewards.clip_backbone import image_embeds
        from nablagfn.rewards_service.rewards.preprocess import clip_preprocess

        p = next(self.clip.parameters())
        x = clip_preprocess(_as_rgb(images).to(p.device, torch.float32), self.image_size)
        return image_embeds(self.clip, x.to(p.dtype)).float()


class DreamSimFeatures(nn.Module):
    """DreamSim embeddings (its `embed`) of images in [0, 1], resized to 224×224 (bicubic)."""

    name = "dreamsim"
    size = 224

    def __init__(self, model):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_dir(cls, model_path=None, device="cpu") -> "DreamSimFeatures":
        try:
            from dreamsim import dreamsim
        except Exception as exc:
            raise FeatureError(f"features=dreamsim: the dreamsim package does not import here "
                               f"({type(exc).__name__}: {exc}); install it (it needs a working "
                               "torchvision) or use features=clip") from None
        kwargs = {"cache_dir": str(Path(model_path).expanduser())} if model_path else {}
        model, _ = dreamsim(pretrained=True, device=str(device), **kwargs)
        return cls(model)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = _as_rgb(images).float()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                              antialias=True)
        device = next(self.model.parameters()).device
        return self.model.embed(x.clamp(0, 1).to(device)).float()


register_features("clip")(ClipImageFeatures.from_dir)
register_features("dreamsim")(DreamSimFeatures.from_dir)


def resolve_features(name: str) -> tuple[str, Callable[..., Any]]:
    """(resolved name, factory) for `name` ("auto" picks dreamsim when importable, else clip)."""
    if name == "auto":
        name = "dreamsim" if dreamsim_available() else "clip"
    if name in _REGISTRY:
        return name, _REGISTRY[name]
    if ":" not in name:
        raise FeatureError(f"features: unknown name {name!r}; known: {known_features()} "
                           "(or a dotted path package.module:callable)")
    return name, load_dotted(name, FeatureError, "features")


def build_feature_extractor(name: str = "auto", model_path: str | Path | None = None,
                            device: str | torch.device = "cpu"):
    """The extractor `name` on `device` (module docstring); its `.name` is the resolved name."""
    resolved, factory = resolve_features(name)
    extractor = factory(model_path, device)
    if not callable(extractor):
        raise FeatureError(f"features {name!r} built a non-callable {type(extractor).__name__}")
    if isinstance(extractor, nn.Module):
        extractor = extractor.to(device).eval()
    if getattr(extractor, "name", None) is None:
        try:
            extractor.name = resolved
        except AttributeError:
            pass
    return extractor


@torch.no_grad()
def extract_features(extractor, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """extractor(images) in chunks of `batch_size`, checked: (B, D) finite float32 on CPU."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        f = extractor(images[start:start + batch_size])
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != images[start:start + batch_size].shape[0]:
            raise FeatureError(f"feature extractor {getattr(extractor, 'name', extractor)!r} must return "
                               f"(B, D), got {getattr(f, 'shape', type(f).__name__)}")
        out.append(f.detach().float().cpu())
    feats = torch.cat(out)
    if not torch.isfinite(feats).all():
        raise FeatureError(f"feature extractor {getattr(extractor, 'name', extractor)!r} returned NaN/inf")
    return feats
