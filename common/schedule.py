"""The sampler's time grid, built from any diffusers scheduler config (a plain dict).

A `SamplingSchedule` lists, for the N + 1 states x_0 (noisiest) … x_N (clean) of the MDP, the
integer model timestep at each of the first N states and ᾱ at every state. The last state sits at
`final_alpha_cumprod` (SD1.5: ᾱ at timestep 0, so every step keeps σ > 0). Pure numpy/torch, no
diffusers import: the betas formulas are the ones diffusers' schedulers use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def betas_from_config(cfg: dict) -> np.ndarray:
    """Training betas (float64) from num_train_timesteps, beta_start/end, beta_schedule."""
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float64)
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    # diffusers builds betas in float32 with torch.linspace; do the same so ᾱ agrees bit-for-bit.
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32).double().numpy()
    if kind == "scaled_linear":
        return (torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2).double().numpy()
    if kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"beta_schedule {kind!r} is not one of linear, scaled_linear, squaredcos_cap_v2")


def alphas_cumprod_from_config(cfg: dict) -> np.ndarray:
    """ᾱ_t as diffusers holds it (float32 cumulative product), returned as float64."""
    betas = torch.tensor(betas_from_config(cfg), dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


def inference_timesteps(cfg: dict, num_steps: int, spacing: str | None = None) -> np.ndarray:
    """Model timesteps for `num_steps` sampling steps, noisiest first (diffusers' set_timesteps)."""
    T = int(cfg.get("num_train_timesteps", 1000))
    if num_steps > T:
        raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={T}")
    spacing = spacing or cfg.get("timestep_spacing", "leading")
    offset = int(cfg.get("steps_offset", 0))
    if spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + offset
    elif spacing == "trailing":
        ratio = T / num_steps
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of leading, trailing, linspace")
    return ts


@dataclass(frozen=True)
class SamplingSchedule:
    """timesteps: (N,) int64 model timestep at states 0..N-1 (float64 t·T for a flow-matching model,
    prediction_type "flow"); alpha_bar: (N+1,) float64 ᾱ of states."""

    timesteps: torch.Tensor
    alpha_bar: torch.Tensor
    prediction_type: str = "epsilon"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def state_timesteps(self) -> torch.Tensor:
        """Model timestep of every state, 0 for the terminal one (its ᾱ is ᾱ at timestep 0)."""
        return torch.cat([self.timesteps, self.timesteps.new_zeros(1)])

    def step_alphas(self, step_idx: torch.Tensor, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ at x_t, ᾱ at x_t') for per-sample step indices (K,)."""
        a = self.alpha_bar.to(dtype)
        return a[step_idx], a[step_idx + 1]


def make_schedule(scheduler_config: dict, num_steps: int, kind: str = "ddim") -> SamplingSchedule:
    """The MDP time grid for a sampler `kind` ("ddim" or "dpm_sde") from a scheduler config.

    DDIM uses the config's own spacing (SD: "leading", steps_offset 1) and the final state at
    `final_alpha_cumprod` (1 if set_alpha_to_one, else ᾱ_0). SDE-DPM-Solver++ uses diffusers'
    DPMSolverMultistepScheduler grid ("linspace") with `final_sigmas_type="sigma_min"`, whose
    last state also sits at ᾱ_0, so the last step stays stochastic.

    A flow-matching config (FlowMatchEulerDiscreteScheduler) gives the flow model's grid on its
    VP-equivalent path (common/flow_matching.py: float timesteps t·T, ᾱ = (1−t)²/((1−t)² + t²)) for
    any kind: on that path "flow_sde", "ddim" and "dpm_sde" are all valid steps. "flow_sde" on a
    DDPM config is DDIM-η on the DDIM grid (the same Gaussian step).
    """
    from .flow_matching import flow_schedule, is_flow_matching_config

    if kind not in ("ddim", "dpm_sde", "flow_sde"):
        raise ValueError(f"sampler kind {kind!r} is not one of ddim, dpm_sde, flow_sde")
    if is_flow_matching_config(scheduler_config):
        return flow_schedule(scheduler_config, num_steps)
    ac = alphas_cumprod_from_config(scheduler_config)
    if kind in ("ddim", "flow_sde"):
        ts = inference_timesteps(scheduler_config, num_steps)
        final = 1.0 if scheduler_config.get("set_alpha_to_one", True) else float(ac[0])
    elif kind == "dpm_sde":
        spacing = scheduler_config.get("timestep_spacing", "linspace")
        if spacing == "linspace":
            T = int(scheduler_config.get("num_train_timesteps", 1000))
            ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        else:
            ts = inference_timesteps(scheduler_config, num_steps, spacing)
        final = float(ac[0])
    else:
        raise ValueError(f"sampler kind {kind!r} is not one of ddim, dpm_sde")
    alpha_bar = np.concatenate([ac[ts], [final]])
    return SamplingSchedule(
        timesteps=torch.as_tensor(ts.copy(), dtype=torch.int64),
        alpha_bar=torch.as_tensor(alpha_bar, dtype=torch.float64),
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
    )


SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "clip_sample": False,
}
"""Stable Diffusion 1.x's scheduler settings (also the GMM benchmark's schedule)."""
