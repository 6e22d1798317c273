"""The flow-SDE step: a Gaussian transition of a rectified-flow model with an exposed noise level.

Path (common/flow_matching.py): x_t = s x₀ + σ ε with s = 1 − t, σ = t; the sampler's state is the
VP-rescaled x̃_t = x_t / c_t, c_t = √(s² + σ²), which sits on the VP path with ᾱ_t = s²/c_t². The step
takes (x̃, ε̂, ᾱ_t, ᾱ_t', η) like every sampler here and recovers t = √(1−ᾱ)/(√ᾱ + √(1−ᾱ)).

**Derivation.** For any ν ∈ [0, σ'] the Gaussian
    q_ν(x_t' | x_t, x₀) = N( s' x₀ + √(σ'² − ν²) · (x_t − s x₀)/σ ,  ν² I )
has, given x₀, the marginal N(s' x₀, σ'² I) — the path's own marginal at t' — because
(x_t − s x₀)/σ = ε ~ N(0, I) and (σ'² − ν²) + ν² = σ'². Substituting the model's x̂₀ = (x_t − σ ε̂)/s
(so (x_t − s x̂₀)/σ = ε̂) gives the sampler, in native and in VP coordinates:

    μ_t' = s' x̂₀ + √(σ'² − ν²) ε̂,      x_t' = μ_t' + ν z,       z ~ N(0, I)
    μ̃    = μ_t' / c_t',                  std = ν / c_t'.

**Noise level.** ν² = η² σ'² (1 − r²), r = (s σ')/(s' σ) ∈ (0, 1) (the ratio of noise-to-signal
ratios; t' < t ⇒ r < 1):
  * η = 1: q_ν is the forward process' own posterior q(x_t' | x_t, x₀) — the DDPM-like step;
  * η → 0: μ = s'(x − σ ε̂)/s + σ' ε̂, with ε̂ = x + s v̂ this is x + (t' − t) v̂: **exactly the Euler
    step of the probability-flow ODE**, i.e. diffusers' `FlowMatchEulerDiscreteScheduler.step`;
  * small steps: 1 − r² ≈ 2 Δt / (t(1 − t)), so ν² ≈ g(t)² Δt with g(t)² = 2 η² t/(1 − t): the
    Euler–Maruyama step of the reverse SDE with the path's marginals,
        dx = [v + (g²/2t)(x + (1 − t) v)] dt + g dw̄        (∇log p_t = −ε̂/t),
    whose noise level σ_t = a √(t/(1−t)) (Flow-GRPO's parameterisation) is a = η √2.

In VP coordinates ν/c_t' is exactly DDIM's σ_η = η √((1−ᾱ')/(1−ᾱ)) √(1 − ᾱ/ᾱ'), so this step is
DDIM-η on the flow model's VP-equivalent ᾱ (verified in tests/common/test_flow_sde.py): the Gaussian
scores, log-probabilities, Stein VJPs and the residual ∇-DB objective of common/samplers apply as
they are, and μ̃ = a x̃ + b ε̂ with
    a = s' c / (s c'),      b = √(σ'² − ν²)/c' − s' σ / (s c').
"""
from __future__ import annotations

import torch

from ..flow_matching import sigma_from_alpha_bar, vp_scale
from .gaussian import GaussianStep, per_sample


def flow_noise_std(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> torch.Tensor:
    """ν (native units) of the step t → t': ν² = η² t'² (1 − ((1−t) t' / ((1−t') t))²)."""
    r = ((1 - sigma) * sigma_next) / ((1 - sigma_next) * sigma)
    return eta * sigma_next * (1 - r * r).clamp_min(0).sqrt()


def flow_sde_coefficients(alpha_bar_t: torch.Tensor, alpha_bar_next: torch.Tensor, eta: float):
    """(a, b, std, native) with μ̃ = a x̃ + b ε̂ in VP coordinates; native = (s, σ, c, s', σ', c', ν)."""
    sig, sig_n = sigma_from_alpha_bar(alpha_bar_t), sigma_from_alpha_bar(alpha_bar_next)
    s, s_n = 1 - sig, 1 - sig_n
    c, c_n = vp_scale(sig), vp_scale(sig_n)
    nu = flow_noise_std(sig, sig_n, eta)
    dir_coef = (sig_n**2 - nu**2).clamp_min(0).sqrt()
    x_coef = s_n * c / (s * c_n)
    eps_coef = dir_coef / c_n - s_n * sig / (s * c_n)
    return x_coef, eps_coef, nu / c_n, (s, sig, c, s_n, sig_n, c_n, nu, dir_coef)


def flow_sde_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
                  alpha_bar_next: torch.Tensor, eta: float = 1.0) -> GaussianStep:
    """One flow-SDE transition of VP-rescaled states x̃ (B, ...) with the model's ε̂ (see above)."""
    a_t = per_sample(alpha_bar_t, x)
    a_n = per_sample(alpha_bar_next, x)
    x_coef, eps_coef, std, (s, sig, c, s_n, sig_n, c_n, nu, dir_coef) = flow_sde_coefficients(a_t, a_n, eta)
    x0 = (c * x - sig * eps) / s  # native x_t = c x̃; x̂₀ = (x_t − t ε̂)/(1 − t)
    mean = (s_n * x0 + dir_coef * eps) / c_n
    return GaussianStep(mean=mean, std=std, x0=x0, x_coef=x_coef, eps_coef=eps_coef)
