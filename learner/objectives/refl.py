"""ReFL (ImageReward, Xu et al. 2023): reward feedback on a one-step prediction from a random late step.

Sample with the policy, without gradient, down to a stop state s drawn uniformly from the late
part of the chain, s ∈ {⌊f·N⌋, …, N−1} (f = `min_step_fraction`); one policy call with gradient
gives the one-step prediction and the loss maximises the reward there:

    x̂₀ = (x_s − √(1−ᾱ_s) ε_θ(x_s, s)) / √ᾱ_s,          L = −β · mean_b log R(x̂₀^b)

(x_s detached: the gradient reaches θ through that one ε_θ call, the VAE and the reward only).
Pure tensor functions.
"""
from __future__ import annotations

import torch

from nablagfn.common.prediction import x0_from_eps
from nablagfn.common.subsample import first_stop_step  # noqa: F401 - part of this objective's API

from .draft import draft_loss


def draw_stop_steps(batch: int, num_steps: int, min_step_fraction: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch,) stop states, uniform on {⌊f·N⌋, …, N−1}."""
    lo = first_stop_step(num_steps, min_step_fraction)
    return torch.randint(lo, num_steps, (batch,), generator=generator)


def refl_x0(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂₀ = (x − √(1−ᾱ) ε)/√ᾱ with per-row ᾱ (B,); the graph goes through ε only (x is data)."""
    return x0_from_eps(eps, x.detach(), alpha_bar)


def refl_loss(log_r: torch.Tensor, reward_scale: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L = −β · mean log R(x̂₀) (the same reduction as DRaFT's)."""
    return draft_loss(log_r, reward_scale, weight)
