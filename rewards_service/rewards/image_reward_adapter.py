"""ImageReward (THUDM): BLIP ViT-L image encoder + BLIP text encoder (cross-attention) + MLP head.

Decision: supported ONLY through the extra `nablagfn[image-reward]`, installed in its own
environment with its own pins (the `image-reward` package needs `pkg_resources` from an old
setuptools, a working torchvision, and transformers < 5: its BLIP code imports
`apply_chunking_to_forward`, removed in transformers 5). We do not port the BLIP checkpoint into
maintained transformers classes: that mapping could not be checked here without the weights.
Building the reward where the package cannot be imported raises RewardError.

What is ours and tested without the package: differentiable preprocessing (resize shortest side
to 224, center crop, CLIP normalisation, as ImageReward's `_transform`), the head formula
`(mlp(CLS feature) − mean) / std` with ImageReward's constants, the head's key mapping from the
full checkpoint (`mlp.layers.*`), and the glue `ImageRewardModel` (tokenise, visual encoder, text
encoder with the image as cross-attention memory, CLS feature, head) on a stand-in with the BLIP
interface. What is not tested here: the real BLIP forward and checkpoint load (package route).
The extra route also needs local files: `reward.weights_path` = ImageReward.pt, kwarg
`med_config` = its med_config.json, and the `bert-base-uncased` tokenizer in the HF cache.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .aesthetic import LaionAestheticHead
from .base import RewardError, RewardModel, check_kwargs
from .preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .registry import register_reward
from .weights import load_state_dict, require_file, strip_prefix

# ImageReward.py: self.mean / self.std, the normalisation of the raw head output.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
INSTALL_HINT = ("install the extra `pip install nablagfn[image-reward]` in an environment with its "
                "own pins (transformers<5, a setuptools that has pkg_resources, "
                "a working torchvision)")


class ImageRewardHead(LaionAestheticHead):
    """ImageReward's MLP (same layout as the LAION head) followed by (r − mean) / std."""

    def __init__(self, in_dim: int = 768, mean: float = IMAGE_REWARD_MEAN,
                 std: float = IMAGE_REWARD_STD):
        super().__init__(in_dim)
        self.mean, self.std = float(mean), float(std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.layers(features).squeeze(-1) - self.mean) / self.std


def load_image_reward_head(source: str | Path | dict) -> ImageRewardHead:
    """The head from the full ImageReward checkpoint (keys `mlp.layers.*`) or a state dict."""
    sd = source if isinstance(source, dict) else load_state_dict(source, "image_reward checkpoint")
    sd = strip_prefix(sd, "layers.", prefixes=("mlp.", "module.mlp.", ""))
    if "layers.0.weight" not in sd:
        raise RewardError("image_reward: no `mlp.layers.0.weight` in the checkpoint")
    head = ImageRewardHead(in_dim=sd["layers.0.weight"].shape[1])
    missing, unexpected = head.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RewardError(f"image_reward head: missing {missing}, unexpected {unexpected}")
    return head


@register_reward("image_reward")
class ImageRewardModel(RewardModel):
    """log R = ImageReward score. `blip` needs ImageReward's BLIP interface: `tokenizer`,
    `visual_encoder(pixels) -> (B, N, D)`, `text_encoder(ids, attention_mask=,
    encoder_hidden_states=, encoder_attention_mask=, return_dict=True).last_hidden_state`."""

    needs_prompts = True

    def __init__(self, blip, head: ImageRewardHead, *, image_size: int = 224, max_length: int = 35,
                 antialias: bool = True):
        super().__init__()
        self.blip, self.head = blip, head
        self.image_size, self.max_length = int(image_size), int(max_length)
        self.antialias = bool(antialias)
        self.freeze()

    def log_reward(self, images, prompts=None):
        param = next(self.head.parameters())
        x = clip_preprocess(images.to(param.dtype), self.image_size, CLIP_MEAN, CLIP_STD,
                            self.antialias, mode="crop")
        tok = self.blip.tokenizer(list(prompts), padding="max_length", truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
        image_embeds = self.blip.visual_encoder(x)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=x.device)
        out = self.blip.text_encoder(tok.input_ids.to(x.device),
                                     attention_mask=tok.attention_mask.to(x.device),
                                     encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=image_atts, return_dict=True)
        return self.head(out.last_hidden_state[:, 0, :].to(param.dtype))

    @classmethod
    def from_config(cls, cfg, device="cpu"):
        kw = check_kwargs(cfg.name, cfg.kwargs,
                          ["med_config", "image_size", "max_length", "antialias"])
        path = require_file(cfg.weights_path, "image_reward checkpoint")
        med_config = require_file(kw.pop("med_config", None), "image_reward med_config.json",
                                  "reward.kwargs.med_config")
        try:
            from ImageReward.ImageReward import ImageReward as PackageImageReward
        except Exception as exc:
            raise RewardError(f"image_reward: cannot import the ImageReward package "
                              f"({type(exc).__name__}: {exc}); {INSTALL_HINT}") from exc
        model = PackageImageReward(med_config=str(med_config), device=device)
        sd = load_state_dict(path, "image_reward checkpoint")
        model.load_state_dict(sd, strict=False)
        return cls(model.blip, load_image_reward_head(sd), **kw)
