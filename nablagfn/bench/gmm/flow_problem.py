"""The GMM benchmark's flow-matching variant (`nablagfn bench gmm --model-family flow`).

The pretrained model is a rectified-flow model: the exact velocity of the mixture under the path
x_t = (1 − t) x₀ + t ε. Given the data p₀ = Σ_k w_k N(μ_k, s₀² I), x_t | k ~ N((1 − t) μ_k, V_t I)
with V_t = (1 − t)² s₀² + t², and with d_k = x_t − (1 − t) μ_k:

    p(k | x_t) ∝ w_k N(x_t; (1 − t) μ_k, V_t I)
    E[x₀ | x_t, k] = μ_k + ((1 − t) s₀² / V_t) d_k,        E[ε | x_t, k] = (t / V_t) d_k
    v#(x_t, t) = E[ε − x₀ | x_t] = Σ_k p(k | x_t) ( (t − (1 − t) s₀²) d_k / V_t − μ_k ).

The sampler sees this model only through the flow-matching conversions (common/flow_matching.py):
its states are the VP-rescaled x̃ = x_t / c_t, its schedule the VP-equivalent ᾱ of the
FlowMatchEulerDiscreteScheduler grid (SD3's config: shift 3), its ε̂ = x_t + (1 − t) v#, and its step
the flow-SDE transition (common/samplers/flow_sde.py). Everything else — the objective, the exact
target, the exact flow (closed forms in VP coordinates, which x̃ are) and the figures — is shared
with the DDPM variant: `FlowGMMProblem` has `run.GMMProblem`'s interface.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from nablagfn.common.config import SamplerConfig
from nablagfn.common.flow_matching import eps_from_velocity_vp, sigma_from_alpha_bar, to_native
from nablagfn.common.samplers import get_transition
from nablagfn.common.schedule import SamplingSchedule, make_schedule

from .run import GMMProblem
from .spec import GMMSpec

SD3_FLOW_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}
"""Stable Diffusion 3's scheduler settings (the flow variant's schedule)."""

MODEL_FAMILIES = ("ddpm", "flow")


def mixture_velocity(spec: GMMSpec, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact v#(x_t, t) of the noised mixture at native states x (B, d), noise levels t (B,)."""
    t = sigma.to(x)[:, None]
    s0 = spec.std**2
    V = (1 - t) ** 2 * s0 + t**2  # (B,1)
    mu = spec.means.to(x)  # (K,d)
    d = x[:, None, :] - (1 - t)[:, :, None] * mu[None]  # (B,K,d)
    logits = torch.log(spec.weights.to(x)) - (d**2).sum(-1) / (2 * V)
    post = torch.softmax(logits, dim=1)  # (B,K)
    per_k = ((t - (1 - t) * s0) / V)[:, :, None] * d - mu[None]
    return (post[:, :, None] * per_k).sum(1)


def mixture_log_density(spec: GMMSpec, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log p_t(x) of the rectified-flow marginal at native states (for tests)."""
    t = sigma.to(x)[:, None]
    V = (1 - t) ** 2 * spec.std**2 + t**2
    sq = ((x[:, None, :] - (1 - t)[:, :, None] * spec.means.to(x)[None]) ** 2).sum(-1)
    log_n = -sq / (2 * V) - 0.5 * spec.dim * torch.log(2 * math.pi * V)
    return torch.logsumexp(torch.log(spec.weights.to(x)) + log_n, dim=1)


class FlowGMMProblem(GMMProblem):
    """`GMMProblem` with a rectified-flow pretrained model and the flow-SDE sampler.

    `sampler.kind` "ddim" (the bench default) becomes "flow_sde", the same Gaussian step written in
    flow coordinates; "dpm_sde" is kept (also valid on the VP-equivalent path).
    """

    def __init__(self, spec: GMMSpec, sampler: SamplerConfig, dtype=torch.float32,
                 scheduler_config: dict | None = None):
        if sampler.kind == "ddim":
            sampler = dataclasses.replace(sampler, kind="flow_sde")
        self.spec = spec
        self.sampler = sampler
        self.schedule: SamplingSchedule = make_schedule(scheduler_config or SD3_FLOW_SCHEDULER_CONFIG,
                                                        sampler.num_steps, sampler.kind)
        self.alpha_bar = self.schedule.alpha_bar.to(dtype)
        self.sigma = sigma_from_alpha_bar(self.schedule.alpha_bar)  # float64 t of every state
        self.state_t = self.schedule.state_timesteps()
        self.step_fn = get_transition(sampler.kind)
        self.dtype = dtype

    def pretrained_velocity(self, x_vp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """v# at the native point c_t x̃ of the VP states x̃ (B, d) at schedule states idx (B,)."""
        sig = self.sigma[idx]
        return mixture_velocity(self.spec, to_native(x_vp, sig), sig)

    def pretrained_eps(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """ε̂ = x_t + (1 − t) v#(x_t) at x_t = c_t x̃: the flow model as an ε-model on the VP path."""
        return eps_from_velocity_vp(self.pretrained_velocity(x, idx), x, self.sigma[idx]).to(x.dtype)


def make_problem(spec: GMMSpec, sampler: SamplerConfig, model_family: str = "ddpm") -> GMMProblem:
    """The benchmark problem of `model_family`: "ddpm" (ε-model, SD schedule) or "flow"."""
    if model_family == "ddpm":
        return GMMProblem(spec, sampler)
    if model_family == "flow":
        return FlowGMMProblem(spec, sampler)
    raise ValueError(f"model_family {model_family!r} is not one of {list(MODEL_FAMILIES)}")
