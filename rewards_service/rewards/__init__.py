"""Reward models: log R per image, differentiable w.r.t. images in [0, 1] (see base.py).

Built-in names: brightness, color (analytic), aesthetic, clip_score, hpsv2, image_reward,
digit_classifier (log p(k | x) on 8×8 digits); more
through entry points (group `nablagfn.rewards`) or dotted paths, resolved by `build_reward`.
"""
from .aesthetic import AestheticReward, LaionAestheticHead, load_laion_head
from .analytic import BrightnessReward, ColorReward
from .base import RewardError, RewardModel
from .clip_score import ClipScoreReward
from .digit_classifier import DigitClassifierReward, DigitCNN
from .hpsv2_adapter import HPSv2Reward, build_hpsv2_model, hps_score
from .image_reward_adapter import ImageRewardHead, ImageRewardModel, load_image_reward_head
from .latent_reward import LatentRewardResult, decode_latents, log_reward_and_grad
from .preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .registry import (ENTRY_POINT_GROUP, build_reward, known_rewards, register_reward,
                       resolve_reward)

__all__ = [
    "AestheticReward", "BrightnessReward", "CLIP_MEAN", "CLIP_STD", "ClipScoreReward",
    "ColorReward", "DigitCNN", "DigitClassifierReward",
    "ENTRY_POINT_GROUP", "HPSv2Reward", "ImageRewardHead", "ImageRewardModel", "LaionAestheticHead",
    "LatentRewardResult", "RewardError", "RewardModel", "build_hpsv2_model", "build_reward",
    "clip_preprocess", "decode_latents", "hps_score", "known_rewards", "load_image_reward_head",
    "load_laion_head", "log_reward_and_grad", "register_reward", "resolve_reward",
]
