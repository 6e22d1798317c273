"""Flow-matching (rectified-flow) models seen as ε-models on a variance-preserving path.

Notation: t ∈ [0, 1] is diffusers' `sigma` of `FlowMatchEulerDiscreteScheduler` (t = 1 pure noise),
the model timestep is t·T (T = num_train_timesteps), and the forward path is the straight line

    x_t = s_t x₀ + σ_t ε,   s_t = 1 − t,  σ_t = t,   ε ~ N(0, I).

**Predictions from the velocity.** The network predicts v = dx_t/dt = ε − x₀ (its training target,
so v̂(x_t) = E[ε − x₀ | x_t]). The 2×2 system x_t = (1 − t) x₀ + t ε, v = ε − x₀ inverts to

    ε̂  = x_t + (1 − t) v̂,            x̂₀ = x_t − t v̂,            v̂ = (ε̂ − x_t)/(1 − t).

**The variance-preserving form.** Divide the state by c_t = √(s_t² + σ_t²):

    x̃_t = x_t / c_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε,     ᾱ_t = s_t² / (s_t² + σ_t²) = (1−t)² / ((1−t)² + t²).

x̃ follows exactly the DDPM/VP path of the samplers (common/samplers), with the same x₀ and the same
ε, so ε̂ above is also the ε-prediction at x̃ and Tweedie's x̂₀ = (x̃ − √(1−ᾱ) ε̂)/√ᾱ is the same x̂₀.
The map t ↦ ᾱ_t is strictly decreasing, with inverse (use √ᾱ/√(1−ᾱ) = (1−t)/t):

    t = √(1−ᾱ) / (√ᾱ + √(1−ᾱ)),        c_t = 1 / (√ᾱ + √(1−ᾱ)).

So the sampling MDP of a flow model lives on x̃ (states divided by c_t), its schedule is the list of
ᾱ_t, and every ε-based piece — the Gaussian steps, their scores, x̂₀, the ε-unit losses, the residual
∇-DB objective — runs on it unchanged. Scores convert as ∇_x̃ log p = c_t ∇_x log p.
The Gaussian step with a noise level (and its equations) is in common/samplers/flow_sde.py.

**Time grid.** `flow_schedule` puts the N + 1 states of an N-step MDP at the scheduler's shifted
noise levels t_i = shift(τ_i), τ_i evenly spaced from (T−1)/T down to 1/T — the first and the last
training noise levels strictly inside (0, 1), like SD's DDIM grid ending at ᾱ at timestep 0. The ends
t = 1 and t = 0 are excluded on purpose: at t = 1, ᾱ = 0 and ε̂ = x̃ carries no information about x₀
(the ε-parameterised step divides by √ᾱ = 0); at t = 0 the last step would have no noise, so its
log-probability and scores would not exist. Shifting follows the scheduler: static
shift(τ) = sτ/(1 + (s−1)τ), or with `use_dynamic_shifting` the exponential / linear time shift with
the caller's μ; `shift_terminal` stretches the grid as diffusers does.

Pure tensor/numpy functions; float64 wherever the schedule is computed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .prediction import expand_like

FLOW_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


# -- the path ------------------------------------------------------------------------------------
def alpha_bar_from_sigma(sigma):
    """VP-equivalent ᾱ = (1−t)²/((1−t)² + t²) of flow noise level t (tensor or float)."""
    s = 1 - sigma
    return s * s / (s * s + sigma * sigma)


def sigma_from_alpha_bar(alpha_bar):
    """Inverse of `alpha_bar_from_sigma`: t = √(1−ᾱ)/(√ᾱ + √(1−ᾱ))."""
    if isinstance(alpha_bar, torch.Tensor):
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    else:
        a, b = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    return b / (a + b)


def vp_scale(sigma):
    """c_t = √((1−t)² + t²): x_t = c_t · x̃_t (native rectified-flow state from the VP state)."""
    s = 1 - sigma
    if isinstance(sigma, torch.Tensor):
        return (s * s + sigma * sigma).sqrt()
    return math.sqrt(s * s + sigma * sigma)


def to_native(x_vp: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = c_t x̃_t; sigma per sample (B,) or scalar."""
    return x_vp * expand_like(vp_scale(torch.as_tensor(sigma, dtype=torch.float64)), x_vp)


def to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
    """x̃_t = x_t / c_t."""
    return x / expand_like(vp_scale(torch.as_tensor(sigma, dtype=torch.float64)), x)


# -- predictions (native state x_t) --------------------------------------------------------------
def eps_from_velocity(v: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """ε̂ = x_t + (1 − t) v̂ at the native state x_t."""
    t = expand_like(torch.as_tensor(sigma, dtype=torch.float64), x)
    return x + (1 - t) * v


def x0_from_velocity(v: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """x̂₀ = x_t − t v̂ at the native state x_t."""
    t = expand_like(torch.as_tensor(sigma, dtype=torch.float64), x)
    return x - t * v


def velocity_from_eps(eps: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """v̂ = (ε̂ − x_t)/(1 − t) at the native state x_t (t < 1)."""
    t = expand_like(torch.as_tensor(sigma, dtype=torch.float64), x)
    return (eps - x) / (1 - t)


def eps_from_velocity_vp(v: torch.Tensor, x_vp: torch.Tensor, sigma) -> torch.Tensor:
    """ε̂ from the velocity at the VP state x̃ (the network was called at x_t = c_t x̃)."""
    return eps_from_velocity(v, to_native(x_vp, sigma), sigma)


# -- the scheduler config ------------------------------------------------------------------------
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def is_flow_matching_config(cfg: dict) -> bool:
    """Whether a scheduler config (a plain dict) is a FlowMatchEulerDiscreteScheduler's."""
    if cfg.get("_class_name") == FLOW_SCHEDULER_CLASS:
        return True
    return "shift" in cfg and "use_dynamic_shifting" in cfg and "beta_schedule" not in cfg


def shift_sigmas(tau: np.ndarray, cfg: dict, mu: float | None = None) -> np.ndarray:
    """diffusers' shifting of unshifted noise levels τ (float64): static, or dynamic with μ."""
    if cfg.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("scheduler use_dynamic_shifting=True needs mu (the resolution-dependent "
                             "shift): pass mu to flow_schedule")
        kind = cfg.get("time_shift_type", "exponential")
        if kind == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / tau - 1))
        if kind == "linear":
            return mu / (mu + (1 / tau - 1))
        raise ValueError(f"scheduler time_shift_type {kind!r} is not one of exponential, linear")
    shift = float(cfg.get("shift", 1.0))
    if not shift > 0:
        raise ValueError(f"scheduler shift must be > 0, got {shift}")
    return shift * tau / (1 + (shift - 1) * tau)


def flow_sigmas(cfg: dict, num_steps: int, mu: float | None = None) -> np.ndarray:
    """The N + 1 state noise levels t_0 > … > t_N (float64), see the module docstring."""
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ValueError(f"scheduler {key}=True is not supported by the flow-SDE sampler "
                             f"(only static/dynamic shifting and shift_terminal)")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    T = int(cfg.get("num_train_timesteps", 1000))
    if T < 2:
        raise ValueError(f"scheduler num_train_timesteps must be >= 2, got {T}")
    tau = np.linspace((T - 1) / T, 1 / T, num_steps + 1, dtype=np.float64)
    sig = shift_sigmas(tau, cfg, mu)
    terminal = cfg.get("shift_terminal")
    if terminal:
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - float(terminal)))
    if not (np.all(sig > 0) and np.all(sig < 1) and np.all(np.diff(sig) < 0)):
        raise ValueError(f"the flow noise levels must decrease strictly inside (0, 1); got {sig}")
    return sig


def flow_schedule(cfg: dict, num_steps: int, mu: float | None = None):
    """`SamplingSchedule` of a flow-matching model: float64 model timesteps t_i·T at states 0..N−1
    and the VP-equivalent ᾱ of every state (prediction_type "flow")."""
    from .schedule import SamplingSchedule

    sig = flow_sigmas(cfg, num_steps, mu)
    T = int(cfg.get("num_train_timesteps", 1000))
    sig_t = torch.as_tensor(sig, dtype=torch.float64)
    return SamplingSchedule(timesteps=sig_t[:-1] * T, alpha_bar=alpha_bar_from_sigma(sig_t),
                            prediction_type="flow")


def sigma_of_timestep(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Flow noise level of a (float) model timestep: t / T, in float64."""
    return t.detach().to(torch.float64) / float(num_train_timesteps)
