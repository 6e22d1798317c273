"""DRaFT (Clark et al. 2023): fine-tune by backpropagating the reward through the last sampling steps.

DRaFT-K. Run the MDP (ALGORITHM.md §1) without gradient to state N−K, then the last K steps with
the policy's ε carrying θ's graph, x_{N−K} itself detached:

    x_{i+1} = μ_θ(x_i) + σ_i z_i,   i = N−K … N−1,          L = −β · mean_b log R(x_N^b)

so ∂L/∂θ = −β E[∇_{x_N} log R(x_N) · ∂x_N/∂θ] flows through K policy calls (and the VAE and the
reward on the diffusion path). With the noises z_i recovered from a sampled trajectory
(`recover_noise`) the rollout reproduces that trajectory's x_N exactly at the current θ.

DRaFT-LV (K = 1, lower variance). The final sample x_N (detached) is re-noised to state N−1 by the
forward process n times, and each copy takes the last policy step:

    x_{N−1}^j = √(ᾱ_{N−1}/ᾱ_N) x_N + √(1 − ᾱ_{N−1}/ᾱ_N) ε_j,   x_N^j = μ_θ(x_{N−1}^j) + σ_{N−1} z_j,
    L = −β · mean_{b,j} log R(x_N^{b,j}).

Pure tensor functions; ε_θ comes in as a callable of (x, state_idx).
"""
from __future__ import annotations

from typing import Callable

import torch

from nablagfn.common.prediction import expand_like
from nablagfn.common.samplers import get_transition

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def recover_noise(x: torch.Tensor, x_next: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
                  alpha_bar_next: torch.Tensor, sampler: str = "ddim", eta: float = 1.0) -> torch.Tensor:
    """z = (x' − μ(x, ε))/σ: the noise that took x to x' under the step with ε (per-sample ᾱ (B,))."""
    st = get_transition(sampler)(x, eps, alpha_bar_t, alpha_bar_next, eta)
    return (x_next - st.mean) / st.std


def rollout_last_steps(x_start: torch.Tensor, first_step: int, noises: torch.Tensor, eps_fn: EpsFn,
                       alpha_bar: torch.Tensor, sampler: str = "ddim", eta: float = 1.0) -> torch.Tensor:
    """x_N from state `first_step` (x_start detached) through K = noises.shape[1] policy steps, with graph.

    noises: (B, K, *S), noises[:, k] is z of step first_step + k; alpha_bar: (N+1,) ᾱ of the states,
    N = first_step + K.
    """
    step_fn = get_transition(sampler)
    B, K = noises.shape[:2]
    if first_step + K != alpha_bar.shape[0] - 1:
        raise ValueError(f"first_step={first_step} + K={K} steps must end at the last state "
                         f"N={alpha_bar.shape[0] - 1}")
    a = alpha_bar.to(device=x_start.device, dtype=x_start.dtype)
    x = x_start.detach()
    for k in range(K):
        i = first_step + k
        idx = torch.full((B,), i, dtype=torch.long, device=x.device)
        st = step_fn(x, eps_fn(x, idx), a[i].expand(B), a[i + 1].expand(B), eta)
        x = st.mean + st.std * noises[:, k].to(x)
    return x


def renoise(x_final: torch.Tensor, alpha_bar_prev: torch.Tensor | float, alpha_bar_final: torch.Tensor | float,
            noise: torch.Tensor) -> torch.Tensor:
    """Forward-process draw of state N−1 given x_N: √(ᾱ_{N−1}/ᾱ_N) x_N + √(1 − ᾱ_{N−1}/ᾱ_N) ε (detached x_N)."""
    ratio = torch.as_tensor(alpha_bar_prev, dtype=x_final.dtype, device=x_final.device) / \
        torch.as_tensor(alpha_bar_final, dtype=x_final.dtype, device=x_final.device)
    ratio = expand_like(ratio, x_final) if ratio.dim() else ratio
    return ratio.sqrt() * x_final.detach() + (1 - ratio).clamp_min(0).sqrt() * noise


def draft_loss(log_r: torch.Tensor, reward_scale: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L = −β · mean log R over rows (rows with weight 0, e.g. non-finite rewards, do not count)."""
    if weight is None:
        return -reward_scale * log_r.mean()
    w = weight.to(log_r.dtype)
    return -reward_scale * (torch.where(w > 0, log_r, torch.zeros_like(log_r)) * w).sum() / w.sum().clamp_min(1.0)
