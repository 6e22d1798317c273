"""HPSv2 (Human Preference Score v2) through the `hpsv2` package (extra `nablagfn[hpsv2]`).

log R = HPS = cos(image features, prompt features) of HPSv2's fine-tuned OpenCLIP ViT-H-14, i.e.
the diagonal of `image_features @ text_features.T` in hpsv2/img_score.py (features L2-normalised).
The model is built with hpsv2's bundled open_clip factory, with `pretrained=None` (nothing is
downloaded) and the HPSv2 checkpoint (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`) loaded
from the local `reward.weights_path`. hpsv2's open_clip needs torchvision: where it cannot be
imported (this CPU stack) building raises RewardError. Preprocessing follows HPSv2's
ResizeMaxSize (longest side to 224, zero pad) + normalise, differentiably; any size is accepted.

Split so the parts are testable without the package: `hps_score` (the formula) and
`HPSv2Reward` (preprocess -> model(image, text) -> formula) take any model with open_clip's
interface (`model(images, tokens)` -> {"image_features", "text_features"}).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import RewardError, RewardModel, check_kwargs
from .preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .registry import register_reward
from .weights import load_state_dict, require_file

INSTALL_HINT = ("install the extra `pip install nablagfn[hpsv2]` (with a torch-matching "
                "torchvision) on a machine where `import torchvision` works")


def hps_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity (B,): diag(normalise(img) @ normalise(txt).T)."""
    img = image_features / torch.linalg.vector_norm(image_features, dim=-1, keepdim=True)
    txt = text_features / torch.linalg.vector_norm(text_features, dim=-1, keepdim=True)
    return (img * txt).sum(dim=-1)


def _first(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


@register_reward("hpsv2")
class HPSv2Reward(RewardModel):
    """`model`: open_clip-style CLIP with output_dict=True; `tokenizer`: list[str] -> LongTensor."""

    needs_prompts = True

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, *,
                 image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 antialias: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        visual = getattr(model, "visual", None)
        self.image_size = int(image_size or _first(getattr(visual, "image_size", 224)))
        self.mean = tuple(mean or getattr(visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(std or getattr(visual, "image_std", None) or CLIP_STD)
        self.antialias = bool(antialias)
        self.freeze()

    def log_reward(self, images, prompts=None):
        param = next(self.model.parameters())
        x = clip_preprocess(images.to(param.dtype), self.image_size, self.mean, self.std,
                            self.antialias, mode="pad")
        tokens = self.tokenizer(list(prompts)).to(param.device)
        out = self.model(x, tokens)
        return hps_score(out["image_features"], out["text_features"])

    @classmethod
    def from_config(cls, cfg, device="cpu"):
        kw = check_kwargs(cfg.name, cfg.kwargs, ["arch", "image_size", "mean", "std", "antialias"])
        model, tokenizer = build_hpsv2_model(cfg.weights_path, device, kw.pop("arch", "ViT-H-14"))
        return cls(model, tokenizer, **kw)


def import_hpsv2_open_clip():
    """(create_model_and_transforms, get_tokenizer) of hpsv2's bundled open_clip, or RewardError."""
    try:
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    except Exception as exc:  # ImportError, or torchvision's "operator ... does not exist"
        raise RewardError(f"hpsv2 reward: cannot import hpsv2's open_clip ({type(exc).__name__}: "
                          f"{exc}); {INSTALL_HINT}") from exc
    return create_model_and_transforms, get_tokenizer


def build_hpsv2_model(checkpoint, device="cpu", arch: str = "ViT-H-14"):
    """(model, tokenizer): the open_clip `arch` with the local HPSv2 checkpoint, eval, float32."""
    path = require_file(checkpoint, "hpsv2 checkpoint")  # before the import: names the file
    create_model_and_transforms, get_tokenizer = import_hpsv2_open_clip()
    model, _, _ = create_model_and_transforms(
        arch, pretrained=None, precision="fp32", device=device, jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True,
        aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    sd = load_state_dict(path, "hpsv2 checkpoint")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise RewardError(f"hpsv2 checkpoint {path} misses {len(missing)} keys of {arch}, "
                          f"e.g. {missing[:5]}")
    return model.to(device).eval(), get_tokenizer(arch)
