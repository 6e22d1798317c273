"""Fréchet distance between Gaussians fitted to two feature sets (FID's formula), in float64.

For N(μ₁, Σ₁) and N(μ₂, Σ₂) the squared 2-Wasserstein (Fréchet) distance is

    d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.

`frechet_distance` takes the moments and computes the trace term from symmetric eigendecompositions
(Σ₁^{1/2} = V diag(√λ) Vᵀ, then the eigenvalues of the symmetric PSD Σ₁^{1/2} Σ₂ Σ₁^{1/2}), which
equals FID's tr sqrtm(Σ₁ Σ₂) (same eigenvalues) without the complex round-off of a general sqrtm.

`frechet_distance_features` takes the feature sets X (n₁, D), Y (n₂, D) themselves and never forms
a D×D matrix: with A = X̃ᵀ/√(n₁−1), B = Ỹᵀ/√(n₂−1) (X̃, Ỹ centred), Σ₁ = AAᵀ and Σ₂ = BBᵀ, the
non-zero eigenvalues of Σ₁^{1/2} Σ₂ Σ₁^{1/2} are those of Σ₁Σ₂ = AAᵀBBᵀ, i.e. of (AᵀB)(AᵀB)ᵀ, so

    tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} = ‖AᵀB‖_*  (nuclear norm: the sum of singular values of the
                                               n₁×n₂ matrix X̃Ỹᵀ / √((n₁−1)(n₂−1))),

exact also when n < D (the usual case for per-prompt statistics: a few samples of 512-d features),
and O(n²D). Covariances are unbiased (divide by n − 1), as FID's np.cov. The result is clamped at 0:
the true value is ≥ 0 and a negative one can only be round-off (≈ 1e-12 · tr Σ).
"""
from __future__ import annotations

import torch


def _as_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to(dtype=torch.float64, device="cpu")
    if x.ndim != 2:
        raise ValueError(f"{name}: features must be (n, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 samples to fit a covariance, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def gaussian_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (D,), Σ (D, D)) of features (n, D) in float64; Σ unbiased (÷ (n − 1))."""
    x = _as_features(features, "features")
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root V diag(√max(λ, 0)) Vᵀ (negative round-off eigenvalues → 0)."""
    lam, vec = torch.linalg.eigh((m + m.T) / 2)
    return (vec * lam.clamp_min(0).sqrt()) @ vec.T


def frechet_distance(mu1, cov1, mu2, cov2) -> torch.Tensor:
    """d² between N(mu1, cov1) and N(mu2, cov2) (module docstring), a float64 scalar tensor."""
    mu1, mu2 = (torch.as_tensor(m).to(torch.float64) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c).to(torch.float64) for c in (cov1, cov2))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes must be mu (D,), cov (D, D) with one D; got "
                         f"{tuple(mu1.shape)}, {tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}")
    s1 = _sqrt_psd(cov1)
    inner = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return d2.clamp_min(0)


def frechet_distance_features(x, y) -> torch.Tensor:
    """d² between Gaussians fitted to features x (n₁, D) and y (n₂, D), by the nuclear-norm form
    (module docstring); a float64 scalar tensor."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"frechet_distance_features: feature dims differ: x has {x.shape[1]}, "
                         f"y has {y.shape[1]}")
    mx, my = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - mx, y - my
    nx, ny = x.shape[0] - 1, y.shape[0] - 1
    cross = xc @ yc.T / (nx * ny) ** 0.5
    tr_sqrt = torch.linalg.svdvals(cross).sum()
    d2 = (mx - my).square().sum() + xc.square().sum() / nx + yc.square().sum() / ny - 2 * tr_sqrt
    return d2.clamp_min(0)
