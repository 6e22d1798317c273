"""Sampler MDPs: one file per sampler, each step a pure function (x, ε, ᾱ_t, ᾱ_t', η) → GaussianStep."""
from .ddim import ddim_step
from .dpm_sde import dpm_sde_step
from .flow_sde import flow_sde_step
from .gaussian import GaussianStep, backward_score, forward_score, log_prob, mean_vjp

TRANSITIONS = {"ddim": ddim_step, "dpm_sde": dpm_sde_step, "flow_sde": flow_sde_step}


def get_transition(kind: str):
    """The step function of sampler `kind`."""
    try:
        return TRANSITIONS[kind]
    except KeyError:
        raise ValueError(f"unknown sampler {kind!r}; known: {sorted(TRANSITIONS)}") from None


__all__ = ["GaussianStep", "backward_score", "forward_score", "log_prob", "mean_vjp",
           "ddim_step", "dpm_sde_step", "flow_sde_step", "get_transition", "TRANSITIONS"]
