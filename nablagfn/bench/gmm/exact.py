"""Closed forms of the Gaussian-mixture benchmark (ALGORITHM.md §5), float64 pure functions.

Data p₀ = Σ_k w_k N(μ_k, s₀²I); noised x_t = √ᾱ x₀ + √(1−ᾱ) ε has p_t = Σ_k w_k N(√ᾱ μ_k, v I),
v = ᾱ s₀² + 1 − ᾱ, so ε#(x, ᾱ) = −√(1−ᾱ) ∇log p_t(x) exactly. The reward
log R(x) = logsumexp_j(log a_j − ‖x − c_j‖²/(2 s_j²)) makes R^β a sum of Gaussian bumps with
amplitude a_j^β and width s_j²/β (β = 1 when J > 1), so p₀R^β and F̃(x_t) = E[R(x₀)^β | x_t] are
closed form too.
"""
from __future__ import annotations

import math

import torch

from .spec import GMMSpec


def _tilted_bumps(spec: GMMSpec):
    """R^β as Σ_j A_j exp(−‖x − c_j‖²/(2 S_j²)): (log A_j, S_j²)."""
    return spec.beta * torch.log(spec.reward_weights), spec.scales**2 / spec.beta


def log_reward(spec: GMMSpec, x: torch.Tensor) -> torch.Tensor:
    sq = ((x[:, None, :] - spec.centers.to(x)) ** 2).sum(-1)
    return torch.logsumexp(torch.log(spec.reward_weights.to(x)) - sq / (2 * spec.scales.to(x) ** 2), dim=1)


def grad_log_reward(spec: GMMSpec, x: torch.Tensor) -> torch.Tensor:
    z = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(log_reward(spec, z).sum(), z)
    return g


def noised_log_density(spec: GMMSpec, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """log p_t(x) for per-sample ᾱ (B,)."""
    d = spec.dim
    a = alpha_bar.to(x)[:, None]
    v = a * spec.std**2 + 1 - a  # (B,1)
    sq = ((x[:, None, :] - a.sqrt()[:, :, None] * spec.means.to(x)[None]) ** 2).sum(-1)  # (B,K)
    log_n = -sq / (2 * v) - 0.5 * d * torch.log(2 * math.pi * v)
    return torch.logsumexp(torch.log(spec.weights.to(x)) + log_n, dim=1)


def pretrained_eps(spec: GMMSpec, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The exact ε of the noised mixture, ε# = −√(1−ᾱ) ∇log p_t(x); differentiable in x."""
    a = alpha_bar.to(x)[:, None]
    v = a * spec.std**2 + 1 - a
    mu = a.sqrt()[:, :, None] * spec.means.to(x)[None]  # (B,K,d)
    diff = x[:, None, :] - mu
    logits = torch.log(spec.weights.to(x)) - (diff**2).sum(-1) / (2 * v)
    post = torch.softmax(logits, dim=1)  # p(k | x_t)
    score = -(post[:, :, None] * diff).sum(1) / v
    return -(1 - a).sqrt() * score


def log_flow(spec: GMMSpec, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """log F̃(x_t) = log E[R(x₀)^β | x_t] under the pretrained posterior (up to no constant)."""
    d = spec.dim
    a = alpha_bar.to(x)[:, None]
    s0 = spec.std**2
    v = a * s0 + 1 - a  # (B,1)
    mu = spec.means.to(x)
    diff = x[:, None, :] - a.sqrt()[:, :, None] * mu[None]  # (B,K,d)
    log_post = torch.log(spec.weights.to(x)) - (diff**2).sum(-1) / (2 * v)
    log_post = log_post - torch.logsumexp(log_post, dim=1, keepdim=True)  # (B,K)
    m = mu[None] + (a.sqrt() * s0 / v)[:, :, None] * diff  # posterior means (B,K,d)
    c = s0 * (1 - a) / v  # posterior variance (B,1)
    logA, S2 = _tilted_bumps(spec)
    logA, S2 = logA.to(x), S2.to(x)
    tot = S2[None, :] + c  # (B,J)
    sq = ((m[:, :, None, :] - spec.centers.to(x)[None, None]) ** 2).sum(-1)  # (B,K,J)
    terms = (log_post[:, :, None] + logA[None, None] + 0.5 * d * torch.log(S2[None] / tot)[:, None, :]
             - sq / (2 * tot[:, None, :]))
    return torch.logsumexp(terms.flatten(1), dim=1)


def grad_log_flow(spec: GMMSpec, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The exact ∇log F̃(x_t) (autograd of the closed form)."""
    z = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(log_flow(spec, z, alpha_bar).sum(), z)
    return g


def _tilted_components(spec: GMMSpec):
    """p₀R^β = Σ_{k,j} W_kj N(m_kj, V_j I): log-weights (K,J) normalised, means (K,J,d), variances (J,)."""
    d = spec.dim
    s0 = spec.std**2
    logA, S2 = _tilted_bumps(spec)
    tot = s0 + S2  # (J,)
    sq = ((spec.means[:, None, :] - spec.centers[None]) ** 2).sum(-1)  # (K,J)
    logW = (torch.log(spec.weights)[:, None] + logA[None] + 0.5 * d * torch.log(S2 / tot)[None]
            - sq / (2 * tot[None]))
    logW = logW - torch.logsumexp(logW.flatten(), dim=0)
    means = (S2[None, :, None] * spec.means[:, None, :] + s0 * spec.centers[None]) / tot[None, :, None]
    var = s0 * S2 / tot
    return logW, means, var


def target_weights(spec: GMMSpec) -> torch.Tensor:
    """w'_k ∝ w_k Σ_j A_j (S_j²)^{d/2} (s₀² + S_j²)^{−d/2} exp(−‖μ_k − c_j‖²/(2(s₀² + S_j²)))."""
    logW, _, _ = _tilted_components(spec)
    return torch.softmax(torch.logsumexp(logW, dim=1), dim=0)


def sample_target(spec: GMMSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    """Exact samples of the tilted target p₀R^β."""
    logW, means, var = _tilted_components(spec)
    J = logW.shape[1]
    flat = torch.multinomial(torch.softmax(logW.flatten(), 0), n, replacement=True, generator=generator)
    k, j = flat // J, flat % J
    noise = torch.randn(n, spec.dim, generator=generator, dtype=torch.float64)
    return means[k, j] + var[j].sqrt()[:, None] * noise


def sample_data(spec: GMMSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(spec.weights, n, replacement=True, generator=generator)
    return spec.means[k] + spec.std * torch.randn(n, spec.dim, generator=generator, dtype=torch.float64)


def mode_weights(spec: GMMSpec, x: torch.Tensor) -> torch.Tensor:
    """Share of samples whose nearest data mode is k."""
    k = torch.cdist(x.double(), spec.means).argmin(dim=1)
    return torch.bincount(k, minlength=spec.means.shape[0]).double() / x.shape[0]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())
