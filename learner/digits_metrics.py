"""The digits report's statistics, as pure tensor functions (no models, no files).

With reward log R(x) = log p(k | x) and β the reward scale, the exact target of fine-tuning is
p_T(x) ∝ p#(x) · p(k | x)^β. Rejection sampling gives exact draws of it from pretrained samples:
keep x ~ p# with probability p(k | x)^β / M^β, where M ≥ max_x p(k | x); for a probability M = 1,
so the acceptance probability is exp(β (log R(x) − log M)) with log M = 0 and the kept samples
are distributed exactly as p_T (for β = 1: the pretrained model conditioned on class k).

Per sample set (classifier probabilities P (N, 10), penultimate features F (N, D)):
- share classified as k: (1/N) Σ_i 1[argmax_j P_ij = k];
- within-class-k diversity: mean pairwise Euclidean distance of the rows of F with argmax = k
  (common/evaluation/diversity.py, metric l2);
- prior drift: the Fréchet distance d² between Gaussians fitted to F and to the pretrained
  features (common/evaluation/frechet.py, FID's formula).
"""
from __future__ import annotations

import torch

from nablagfn.common.evaluation.diversity import mean_pairwise_distance
from nablagfn.common.evaluation.frechet import frechet_distance_features


def rejection_keep(log_r: torch.Tensor, beta: float, generator: torch.Generator | None = None,
                   log_bound: float = 0.0) -> torch.Tensor:
    """Bool mask (N,): keep row i with probability exp(β (log_r_i − log_bound)).

    log_bound must bound log_r from above (0 for a log-probability), else the acceptance
    probability would exceed 1 and the kept set would not follow p#·R^β: that raises ValueError.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    log_r = log_r.detach().double().cpu()
    if not torch.isfinite(log_r).all():
        raise ValueError("log_r has non-finite entries")
    if float(log_r.max()) > log_bound + 1e-9:
        raise ValueError(f"log_r exceeds log_bound={log_bound} (max {float(log_r.max()):.4g}): "
                         "the acceptance probability must be <= 1")
    accept = torch.exp(beta * (log_r - log_bound)).clamp(max=1.0)
    u = torch.rand(log_r.shape, generator=generator, dtype=torch.float64)
    return u < accept


def predicted_labels(probs: torch.Tensor) -> torch.Tensor:
    """argmax class per row (N,) of probabilities or logits (N, C)."""
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got {tuple(probs.shape)}")
    return probs.argmax(dim=1)


def class_share(probs: torch.Tensor, k: int) -> float:
    """Share of rows whose argmax class is k."""
    labels = predicted_labels(probs)
    return float((labels == k).double().mean()) if labels.numel() else float("nan")


def class_histogram(probs: torch.Tensor) -> list[int]:
    """Counts of argmax classes 0 … C−1."""
    return torch.bincount(predicted_labels(probs), minlength=probs.shape[1]).tolist()


def within_class_diversity(features: torch.Tensor, probs: torch.Tensor, k: int) -> float:
    """Mean pairwise distance of the features of rows classified as k (nan if fewer than 2)."""
    mask = predicted_labels(probs) == k
    if int(mask.sum()) < 2:
        return float("nan")
    return float(mean_pairwise_distance(features[mask], metric="l2"))


def prior_drift(features: torch.Tensor, pretrained_features: torch.Tensor) -> float:
    """Fréchet distance of the feature Gaussians of a sample set and of pretrained samples."""
    return float(frechet_distance_features(features, pretrained_features))
