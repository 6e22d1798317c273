"""Fréchet distance (common/evaluation/frechet.py) against a float64 scipy computation, closed
forms, and its identities."""
import numpy as np
import pytest
import scipy.linalg
import torch

from nablagfn.common.evaluation import frechet_distance, frechet_distance_features, gaussian_stats


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """FID's formula in float64 numpy/scipy: ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr sqrtm(Σ₁Σ₂) (real part)."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def features(rng, n, d, mix, shift):
    return rng.normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize("n1, n2, d", [(200, 150, 8), (60, 80, 40)])
def test_full_rank_matches_scipy(n1, n2, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d))
    x = features(rng, n1, d, a, 1.0)
    y = features(rng, n2, d, a + 0.3 * rng.normal(size=(d, d)), -0.5)
    ref = scipy_frechet(x, y)
    moments = float(frechet_distance(*gaussian_stats(x), *gaussian_stats(y)))
    direct = float(frechet_distance_features(x, y))
    # rtol 1e-9: with n > D both covariances are full rank and well conditioned, so scipy's Schur
    # sqrtm and our eigendecompositions / singular values agree to float64 round-off (measured
    # ≤ 6e-13 relative); a wrong normalisation (n vs n−1) or a dropped term is off by > 1e-2.
    assert moments == pytest.approx(ref, rel=1e-9)
    assert direct == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("n1, n2, d", [(5, 7, 32), (3, 3, 16)])
def test_rank_deficient_few_samples_matches_scipy(n1, n2, d):
    """The per-prompt case: fewer samples than feature dimensions (singular covariances)."""
    rng = np.random.default_rng(n1 * d)
    a = rng.normal(size=(d, d))
    x = features(rng, n1, d, a, 1.0)
    y = features(rng, n2, d, a + 0.3 * rng.normal(size=(d, d)), -0.5)
    ref = scipy_frechet(x, y)
    direct = float(frechet_distance_features(x, y))
    moments = float(frechet_distance(*gaussian_stats(x), *gaussian_stats(y)))
    # rtol 1e-6: Σ₁Σ₂ has D − n exactly-zero eigenvalues that scipy's sqrtm (and our eigh path)
    # see as round-off of size ε‖Σ‖; their square roots, √ε‖Σ‖ ≈ 1e-8 relative, enter the trace
    # (measured: 3e-8). The nuclear-norm path has no such term; both stay far inside 1e-6.
    assert direct == pytest.approx(ref, rel=1e-6)
    assert moments == pytest.approx(ref, rel=1e-6)
    assert direct == pytest.approx(moments, rel=1e-6)


def test_diagonal_gaussians_closed_form():
    """Commuting (diagonal) covariances: d² = ‖μ₁−μ₂‖² + Σ_k (σ₁ₖ − σ₂ₖ)²."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    expected = 1 + 0 + 9 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0  # 12
    # rtol 1e-12: exact arithmetic on small integers and their square roots in float64.
    assert float(frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))) == pytest.approx(expected, rel=1e-12)


def test_identities():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 20)) * 3
    y = rng.normal(size=(9, 20))
    scale = float(np.trace(np.cov(x, rowvar=False)))
    # self-distance: 2 tr Σ − 2 ‖X̃X̃ᵀ‖_* cancels up to round-off (≈ 1e-15 · tr Σ); 1e-12 · tr Σ.
    assert float(frechet_distance_features(x, x)) <= 1e-12 * scale
    # symmetric, and a translation by c moves it by exactly ‖c‖² (tolerance: float64 round-off).
    assert float(frechet_distance_features(x, y)) == pytest.approx(float(frechet_distance_features(y, x)), rel=1e-12)
    c = rng.normal(size=20)
    assert float(frechet_distance_features(x, x + c)) == pytest.approx(float((c ** 2).sum()), rel=1e-9)
    assert float(frechet_distance_features(x, y)) > 1.0  # different distributions are far apart


def test_float32_input_is_computed_in_float64():
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(8, 12)), dtype=torch.float32)
    y = torch.tensor(rng.normal(size=(8, 12)) + 0.1, dtype=torch.float32)
    out = frechet_distance_features(x, y)
    assert out.dtype == torch.float64
    assert float(out) == pytest.approx(scipy_frechet(x.double().numpy(), y.double().numpy()), rel=1e-6)


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((1, 4)), np.zeros((3, 4)), "at least 2 samples"),
    (np.zeros((3, 4)), np.zeros((3, 5)), "feature dims differ"),
    (np.zeros((3,)), np.zeros((3, 5)), r"\(n, D\)"),
    (np.full((3, 4), np.nan), np.zeros((3, 4)), "NaN"),
])
def test_bad_input_names_the_problem(x, y, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance_features(x, y)
