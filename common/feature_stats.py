"""Statistics of feature vectors (float64 numpy): Fréchet distance and mean pairwise distance.

Fréchet distance between Gaussians fitted to two feature sets (the FID formula):
‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½), the matrix square root by scipy.linalg.sqrtm.
"""
from __future__ import annotations

import numpy as np


def _as64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), covariance (F, F), unbiased) of features (N, F), N >= 2."""
    f = _as64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """Fréchet distance of N(mu1, cov1) and N(mu2, cov2); eps·I is added if the product is singular."""
    from scipy import linalg

    mu1, mu2, cov1, cov2 = _as64(mu1), _as64(mu2), _as64(cov1), _as64(cov2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        off = np.eye(cov1.shape[0]) * eps
        covmean = linalg.sqrtm((cov1 + off) @ (cov2 + off))
    covmean = np.real(covmean)
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean), 0.0))


def frechet_from_features(a, b) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def mean_pairwise_distance(features) -> float:
    """Mean Euclidean distance over distinct pairs of rows (N, F); nan when N < 2."""
    f = _as64(features)
    n = f.shape[0]
    if n < 2:
        return float("nan")
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0)
    return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())
