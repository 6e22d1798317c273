"""SDE-DPM-Solver++, first order (for few-step stochastic sampling), as one Gaussian transition.

With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_t' − λ_t > 0:
    x̂₀ = (x − σ_t ε)/α_t
    μ   = (σ_t'/σ_t) e^{−h} x + α_t' (1 − e^{−2h}) x̂₀,      std = σ_t' √(1 − e^{−2h}).
Equal to diffusers' `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
solver_order=1, final_sigmas_type="sigma_min").step` for the same noise. `eta` is accepted for a
uniform signature and must be 1 (the SDE's own noise level).
"""
from __future__ import annotations

import torch

from .gaussian import GaussianStep, per_sample


def dpm_sde_coefficients(alpha_bar_t: torch.Tensor, alpha_bar_next: torch.Tensor):
    al_t, al_n = alpha_bar_t.sqrt(), alpha_bar_next.sqrt()
    sg_t, sg_n = (1 - alpha_bar_t).sqrt(), (1 - alpha_bar_next).sqrt()
    h = torch.log(al_n / sg_n) - torch.log(al_t / sg_t)
    decay = torch.exp(-h)
    keep = 1 - torch.exp(-2 * h)
    x0_coef = al_n * keep
    x_coef = (sg_n / sg_t) * decay + x0_coef / al_t
    eps_coef = -x0_coef * sg_t / al_t
    std = sg_n * keep.clamp_min(0).sqrt()
    return x_coef, eps_coef, std, decay, x0_coef


def dpm_sde_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
                 alpha_bar_next: torch.Tensor, eta: float = 1.0) -> GaussianStep:
    if eta != 1.0:
        raise ValueError(f"dpm_sde has no η knob (got eta={eta}); use the ddim sampler for η != 1")
    a_t = per_sample(alpha_bar_t, x)
    a_n = per_sample(alpha_bar_next, x)
    x_coef, eps_coef, std, decay, x0_coef = dpm_sde_coefficients(a_t, a_n)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = ((1 - a_n).sqrt() / (1 - a_t).sqrt()) * decay * x + x0_coef * x0
    return GaussianStep(mean=mean, std=std, x0=x0, x_coef=x_coef, eps_coef=eps_coef)
