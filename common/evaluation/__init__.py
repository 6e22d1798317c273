"""Evaluation metrics of fine-tuned diffusion policies, as pure functions (`nablagfn eval` uses them).

frechet.py — Fréchet distance of Gaussians fitted to feature sets (prior drift);
diversity.py — mean pairwise embedding distance (cosine, L2), per group;
features.py — the pluggable image feature extractors (DreamSim / CLIP / dotted path);
pareto.py — non-dominated fronts and the reward–diversity / reward–drift plots;
heldout.py — the default held-out evaluation prompts; checkpoints.py — a run dir's checkpoints.
"""
from .checkpoints import Checkpoint, CheckpointError, find_checkpoints, read_lora_dir
from .diversity import grouped_mean_pairwise_distance, mean_pairwise_distance, pairwise_distances
from .features import (ClipImageFeatures, DreamSimFeatures, FeatureError, build_feature_extractor,
                       dreamsim_available, extract_features, known_features, register_features,
                       resolve_features)
from .frechet import frechet_distance, frechet_distance_features, gaussian_stats
from .heldout import HELDOUT_SPLITS, HeldoutError, heldout_prompts
from .pareto import pareto_front, plot_pareto

__all__ = [
    "Checkpoint", "CheckpointError", "ClipImageFeatures", "DreamSimFeatures", "FeatureError",
    "HELDOUT_SPLITS", "HeldoutError", "build_feature_extractor", "dreamsim_available",
    "extract_features", "find_checkpoints", "frechet_distance", "frechet_distance_features",
    "gaussian_stats", "grouped_mean_pairwise_distance", "heldout_prompts", "known_features",
    "mean_pairwise_distance", "pairwise_distances", "pareto_front", "plot_pareto", "read_lora_dir",
    "register_features", "resolve_features",
]
