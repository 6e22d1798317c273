"""The flow-gradient parameterisation ∇log F̃(x_t) = β γ_t ∇_{x_t} log R(x̂₀(x_t)) + g_φ(x_t, t).

The first part (the guess) is a fixed baseline from the reward's gradient at a one-step
prediction; g_φ learns the correction. Pure tensor functions; ALGORITHM.md §2.
"""
from __future__ import annotations

from typing import Callable

import torch

from nablagfn.common.prediction import expand_like


def gamma_t(alpha_bar: torch.Tensor, kind: str) -> torch.Tensor:
    """γ_t: "squared" = ᾱ_t (the authors' default), "sqrt" = √ᾱ_t, "one" = 1."""
    if kind == "squared":
        return alpha_bar
    if kind == "sqrt":
        return alpha_bar.sqrt()
    if kind == "one":
        return torch.ones_like(alpha_bar)
    raise ValueError(f"gamma {kind!r} is not one of squared, sqrt, one")


def chain_to_x(x: torch.Tensor, grad_x0: torch.Tensor, alpha_bar: torch.Tensor,
               x0_fn: Callable[[torch.Tensor], torch.Tensor] | None, mode: str) -> torch.Tensor:
    """∇_x log R(x̂₀(x)) from ∇_{x̂₀} log R: a VJP through the x̂₀ map, or its diagonal 1/√ᾱ_t part."""
    if mode == "diagonal" or x0_fn is None:
        return grad_x0 / expand_like(alpha_bar, x).sqrt()
    if mode != "vjp":
        raise ValueError(f"x0_grad {mode!r} is not one of vjp, diagonal")
    z = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(x0_fn(z), z, grad_outputs=grad_x0.detach())
    return g


def flow_guess(x: torch.Tensor, grad_x0: torch.Tensor, alpha_bar: torch.Tensor, beta: float,
               gamma: str, x0_fn=None, x0_grad: str = "vjp") -> torch.Tensor:
    """β γ_t ∇_x log R(x̂₀(x)), detached (a fixed baseline that g_φ corrects)."""
    g = chain_to_x(x, grad_x0, alpha_bar, x0_fn, x0_grad)
    return (beta * expand_like(gamma_t(alpha_bar, gamma), x) * g).detach()


def flow_output_scale(alpha_bar: torch.Tensor, like: torch.Tensor, flow_output: str) -> torch.Tensor:
    """Factor from g_φ's raw output to a score: 1/√(1−ᾱ_t) when g_φ predicts in ε units, else 1."""
    if flow_output == "eps":
        return 1.0 / expand_like((1 - alpha_bar).sqrt(), like)
    if flow_output == "score":
        return torch.ones((), dtype=like.dtype, device=like.device)
    raise ValueError(f"flow_output {flow_output!r} is not one of eps, score")


def flow_value(raw: torch.Tensor, guess: torch.Tensor, alpha_bar: torch.Tensor, flow_output: str) -> torch.Tensor:
    """∇log F̃ = guess + scale·g_φ (the learned correction on top of the reward guess)."""
    return guess + flow_output_scale(alpha_bar, raw, flow_output) * raw
