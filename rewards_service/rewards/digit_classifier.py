"""The digits reward: log p(digit = k | x) from a small CNN trained on scikit-learn's 8×8 digits.

`DigitCNN` is the classifier (scripts/digits/train_digits_models.py trains it; its weights are
committed under models/digits/classifier/). Its penultimate activations are the feature space
of the digits report (diversity, Fréchet drift). Images come in as (B, 3, H, W) in [0, 1]: the
channels are averaged to grey and other sizes are average-pooled to 8×8.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .base import RewardError, RewardModel, check_kwargs
from .registry import register_reward

IMAGE_SIZE = 8
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class DigitCNN(nn.Module):
    """conv-conv-pool-conv-pool → `features` (penultimate, SiLU) → 10 logits; grey 8×8 in [0, 1]."""

    def __init__(self, width: int = 32, features: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "features": features, "num_classes": num_classes}
        act = nn.SiLU()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), act, nn.Conv2d(width, width, 3, padding=1), act,
            nn.AvgPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), act, nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4, features), act)
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS_FILE))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> "DigitCNN":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise RewardError(f"digit classifier: {folder} has no {CONFIG_FILE} + {WEIGHTS_FILE}; build them "
                              "with `python scripts/digits/train_digits_models.py`")
        model = cls(**json.loads((folder / CONFIG_FILE).read_text()))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model.eval()


def to_grey8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, 1, 8, 8): channel mean, then average pooling to 8×8."""
    grey = images.mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        grey = nn.functional.adaptive_avg_pool2d(grey, IMAGE_SIZE)
    return grey


def default_classifier_dir() -> Path:
    from nablagfn.common.models.bundled import BundledModelMissing, bundled_model_dir

    try:
        return bundled_model_dir("digits", "classifier")
    except BundledModelMissing as exc:
        raise RewardError(f"digit classifier: {exc}") from None


@register_reward("digit_classifier")
class DigitClassifierReward(RewardModel):
    """log R(x) = log p(digit = k | x) (log-softmax of the classifier), differentiable in x."""

    def __init__(self, classifier: DigitCNN, digit: int = 3):
        super().__init__()
        n = classifier.config["num_classes"]
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit < n:
            raise RewardError(f"digit_classifier: reward.kwargs.digit must be in 0..{n - 1}, got {digit!r}")
        self.classifier = classifier
        self.digit = int(digit)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(to_grey8(images).to(next(self.classifier.parameters()).dtype))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate classifier features (B, F): the space of diversity and Fréchet drift."""
        return self.classifier.features(to_grey8(images).to(next(self.classifier.parameters()).dtype))

    def log_reward(self, images, prompts=None):
        return self.logits(images).log_softmax(dim=1)[:, self.digit]

    @classmethod
    def from_config(cls, cfg, device=None):
        kw = check_kwargs(cfg.name, cfg.kwargs, ["digit"])
        folder = cfg.weights_path or cfg.model_path
        classifier = DigitCNN.load(Path(folder).expanduser() if folder else default_classifier_dir())
        return cls(classifier, **kw)
