"""Conversions between a denoiser's output and (ε, x̂₀), for x_t = √ᾱ x₀ + √(1−ᾱ) ε.

`prediction_type` follows diffusers: "epsilon" (output = ε), "v_prediction"
(output = v = √ᾱ ε − √(1−ᾱ) x₀) and "sample" (output = x₀). Pure functions of tensors; `alpha_bar`
broadcasts against `x` (shape (B,) is expanded over the remaining dims).
"""
from __future__ import annotations

import torch


def expand_like(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor to (B, 1, ..., 1) so it broadcasts against x."""
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    if a.dim() == 0:
        return a
    return a.reshape(a.shape + (1,) * (x.dim() - a.dim()))


def eps_from_output(output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    a = expand_like(alpha_bar, x)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x
    if prediction_type == "sample":
        return (x - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, v_prediction, sample")


def x0_from_eps(eps: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Tweedie one-step prediction x̂₀ = (x − √(1−ᾱ) ε) / √ᾱ."""
    a = expand_like(alpha_bar, x)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x0: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = expand_like(alpha_bar, x)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()
