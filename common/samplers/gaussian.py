"""One MDP transition x → x' ~ N(μ(x), σ² I) with μ(x) = a·x + b·ε(x), and its scores.

Both samplers (DDIM-η and SDE-DPM-Solver++ first order) are affine in (x, ε) for a fixed pair of
noise levels, so a step is fully described by (a, b, σ) and the ε that produced it. The forward
score is closed form; the backward score needs J_ε(x), taken by a vector–Jacobian product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..prediction import expand_like


@dataclass
class GaussianStep:
    """mean = x_coef·x + eps_coef·ε; x0 is the one-step prediction; std σ > 0 (all broadcastable)."""

    mean: torch.Tensor
    std: torch.Tensor
    x0: torch.Tensor
    x_coef: torch.Tensor
    eps_coef: torch.Tensor

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * noise


def forward_score(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """∇_{x'} log N(x'; μ, σ²I) = −(x' − μ)/σ²."""
    return -(x_next - mean) / std**2


def log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x'; μ, σ²I) summed over all but the batch dim."""
    d = x_next[0].numel()
    var = std**2
    sq = ((x_next - mean) ** 2 / var).flatten(1).sum(1)
    log_var = torch.log(var).flatten(1).mean(1) if var.dim() > 0 else torch.log(var)
    return -0.5 * (sq + d * log_var + d * math.log(2 * math.pi))


def backward_score(x: torch.Tensor, x_next: torch.Tensor, mean_fn: Callable[[torch.Tensor], torch.Tensor],
                   std: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """∇_x log N(x'; μ(x), σ²I) = J_μ(x)ᵀ (x' − μ(x))/σ², one VJP through `mean_fn`.

    σ does not depend on x for these samplers. With `create_graph`, the result stays
    differentiable w.r.t. the parameters inside `mean_fn` (needs the MATH attention backend on CPU).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        mean = mean_fn(x)
        v = ((x_next - mean) / std**2).detach()
        (g,) = torch.autograd.grad(mean, x, grad_outputs=v, create_graph=create_graph)
    return g


def mean_vjp(x: torch.Tensor, v: torch.Tensor, mean_fn: Callable[[torch.Tensor], torch.Tensor],
             create_graph: bool = False) -> torch.Tensor:
    """J_μ(x)ᵀ v: the Stein backward target's transport of a flow gradient from x' back to x."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        mean = mean_fn(x)
        (g,) = torch.autograd.grad(mean, x, grad_outputs=v.detach(), create_graph=create_graph)
    return g


def per_sample(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients (B,) shaped to broadcast over x (B, ...)."""
    return expand_like(a, x)
