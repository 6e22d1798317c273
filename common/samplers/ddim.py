"""DDIM with stochasticity η (η = 1: DDPM-like ancestral sampling), as one Gaussian transition.

From state x at ᾱ_t to ᾱ_t' (t' < t), with the model's ε:
    x̂₀ = (x − √(1−ᾱ_t) ε)/√ᾱ_t
    σ² = η² (1−ᾱ_t')/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_t')
    μ  = √ᾱ_t' x̂₀ + √(1−ᾱ_t'−σ²) ε,      x' = μ + σ z.
Equal to diffusers' `DDIMScheduler.step` (clip_sample off) for the same noise z.
"""
from __future__ import annotations

import torch

from .gaussian import GaussianStep, per_sample


def ddim_coefficients(alpha_bar_t: torch.Tensor, alpha_bar_next: torch.Tensor, eta: float):
    """(a, b, σ) with μ = a·x + b·ε, as tensors shaped like the inputs."""
    a_t, a_n = alpha_bar_t, alpha_bar_next
    var = eta**2 * (1 - a_n) / (1 - a_t) * (1 - a_t / a_n)
    std = var.clamp_min(0).sqrt()
    dir_coef = (1 - a_n - var).clamp_min(0).sqrt()
    x_coef = (a_n / a_t).sqrt()
    eps_coef = dir_coef - (a_n * (1 - a_t) / a_t).sqrt()
    return x_coef, eps_coef, std


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
              alpha_bar_next: torch.Tensor, eta: float = 1.0) -> GaussianStep:
    a_t = per_sample(alpha_bar_t, x)
    a_n = per_sample(alpha_bar_next, x)
    x_coef, eps_coef, std = ddim_coefficients(a_t, a_n, eta)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = a_n.sqrt() * x0 + (1 - a_n - std**2).clamp_min(0).sqrt() * eps
    return GaussianStep(mean=mean, std=std, x0=x0, x_coef=x_coef, eps_coef=eps_coef)
