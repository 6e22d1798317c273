"""Residual ∇-DB (Nabla-GFlowNet), ALGORITHM.md §2 — the whole objective in one place.

Residual detailed balance  log P_θ(x'|x) − log P#(x'|x) = log F̃(x') − log F̃(x),  F̃(x_N) = R(x_N)^β,
differentiated w.r.t. x' and x, with η (pretrained_strength) on the pretrained terms:

  forward   r_f = ∇_{x'} log P_θ(x'|x) − η ∇_{x'} log P#(x'|x) − ∇log F̃(x')       (trains the policy)
  backward  r_b = ∇log F̃(x) − T(x, x')                                             (trains g_φ)
       T = −[∇_x log P_θ(x'|x) − η ∇_x log P#(x'|x)]   "sampled" (the paper; policy term detached)
       T = J_μ#(x)ᵀ ∇log F̄(x')                          "stein" (policy-free, §2a item 3)
       T = λ-return of Stein targets along the trajectory  "stein_lambda" (see stein_lambda_targets)
  terminal  ‖g_φ(x_N)‖²                          (anchor; plus the backward term on the last step)
  regulariser  λ ‖ε_θ(x) − ε_behaviour(x)‖²

with ∇log F̃(x) = guess(x) + g_φ(x) (flow_param.py), ∇log F̃(x_N) = β ∇log R(x_N) exactly, and F̄ the
Polyak-averaged g_φ inside targets. Units: "score" = the raw residuals above (the authors' form);
"eps" = r_f · σ²/|b| (an ε difference, b the ε coefficient of μ) and r_b · √(1−ᾱ_t).
Pure tensor functions and callables: no Ray, Redis or diffusers here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nablagfn.common.config import NablaDBConfig
from nablagfn.common.prediction import expand_like
from nablagfn.common.samplers import backward_score, get_transition, mean_vjp

from .flow_param import flow_value

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, state_idx) -> ε or g_φ output


@dataclass
class TransitionBatch:
    """K kept transitions x → x_next (from any trajectories), all per-row tensors.

    step_idx: state index of x (x_next is state step_idx + 1); is_last: x_next is terminal.
    guess / guess_next: the flow guess at x / x_next (detached). terminal_flow: β∇log R(x_N) of
    the row's trajectory (used where is_last). stein_target: precomputed targets for stein_lambda.
    fwd_*: where the forward loss evaluates the flow instead of x_next (None = at x_next).
    """

    x: torch.Tensor
    x_next: torch.Tensor
    step_idx: torch.Tensor
    alpha_bar_t: torch.Tensor
    alpha_bar_next: torch.Tensor
    is_last: torch.Tensor
    eps_behaviour: torch.Tensor
    guess: torch.Tensor
    guess_next: torch.Tensor
    terminal_flow: torch.Tensor
    stein_target: Optional[torch.Tensor] = None
    # forward_point="pretrained_mean": the point μ#(x) and the guess / terminal flow there
    fwd_point: Optional[torch.Tensor] = None
    fwd_guess: Optional[torch.Tensor] = None
    fwd_terminal_flow: Optional[torch.Tensor] = None


@dataclass
class Nets:
    """Callables of (x, state_idx). policy_eps carries θ's graph; pretrained_eps is frozen but
    differentiable in x; flow / target_flow give g_φ's raw output (online / Polyak copy)."""

    policy_eps: EpsFn
    pretrained_eps: EpsFn
    flow: EpsFn
    target_flow: EpsFn


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return expand_like(mask.to(like.dtype), like)


def _msq(r: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of the per-coordinate mean square; rows with weight 0 do not count."""
    per_row = r.flatten(1).pow(2).mean(1)
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)


def next_flow(batch: TransitionBatch, raw_next: torch.Tensor, flow_output: str,
              guess=None, terminal=None) -> torch.Tensor:
    """∇log F̃ at the next noise level: the exact terminal flow on last transitions, guess + g_φ elsewhere."""
    guess = batch.guess_next if guess is None else guess
    terminal = batch.terminal_flow if terminal is None else terminal
    learned = flow_value(raw_next, guess, batch.alpha_bar_next, flow_output)
    last = _rows(batch.is_last, learned)
    return last * terminal + (1 - last) * learned


def nabla_db_loss(batch: TransitionBatch, nets: Nets, cfg: NablaDBConfig, sampler: str = "ddim",
                  eta: float = 1.0) -> dict[str, torch.Tensor]:
    """The residual ∇-DB loss terms and their sum (`loss`) for one batch of kept transitions."""
    step_fn = get_transition(sampler)
    x, x_next, idx = batch.x, batch.x_next, batch.step_idx
    eta_p = cfg.pretrained_strength

    eps_pol = nets.policy_eps(x, idx)
    with torch.no_grad():
        eps_pre = nets.pretrained_eps(x, idx)
    pol = step_fn(x, eps_pol, batch.alpha_bar_t, batch.alpha_bar_next, eta)
    pre = step_fn(x, eps_pre, batch.alpha_bar_t, batch.alpha_bar_next, eta)
    var = pre.std**2

    # Flow at x_next (forward target): the Polyak copy, detached, unless the forward loss trains g_φ.
    at_mean = batch.fwd_point is not None
    point = batch.fwd_point if at_mean else x_next
    if cfg.no_flow:
        raw_next = torch.zeros_like(x_next)
    elif cfg.forward_trains_flow:
        raw_next = nets.flow(point, idx + 1)
    else:
        with torch.no_grad():
            raw_next = nets.target_flow(point, idx + 1)
    flow_next = (next_flow(batch, raw_next, cfg.flow_output, batch.fwd_guess, batch.fwd_terminal_flow)
                 if at_mean else next_flow(batch, raw_next, cfg.flow_output))

    # forward: ∇_{x'} log P_θ − η ∇_{x'} log P# − ∇log F̃(x') = ((η−1)x' + μ_θ − η μ#)/σ² − F(x')
    r_fwd = ((eta_p - 1) * x_next + pol.mean - eta_p * pre.mean) / var - flow_next
    if cfg.units == "eps":
        r_fwd = r_fwd * var / pre.eps_coef.abs()
    terms = {"forward": _msq(r_fwd)}

    if cfg.no_flow:
        terms["backward"] = torch.zeros((), dtype=x.dtype)
        terms["terminal"] = torch.zeros((), dtype=x.dtype)
    else:
        flow_x = flow_value(nets.flow(x, idx), batch.guess, batch.alpha_bar_t, cfg.flow_output)
        target = backward_target(batch, nets, cfg, sampler, eta, pre.std)
        r_bwd = flow_x - target
        if cfg.units == "eps":
            r_bwd = r_bwd * expand_like((1 - batch.alpha_bar_t).sqrt(), x)
        weight = None if cfg.last_step_backward else (~batch.is_last).to(x.dtype)
        terms["backward"] = cfg.reverse_loss_scale * _msq(r_bwd, weight)
        terms["terminal"] = terminal_loss(batch, nets, cfg) if cfg.terminal_loss else torch.zeros((), dtype=x.dtype)

    terms["regulariser"] = cfg.unet_reg_scale * _msq(eps_pol - batch.eps_behaviour.to(eps_pol.dtype))
    terms["loss"] = terms["forward"] + terms["backward"] + terms["terminal"] + terms["regulariser"]
    return terms


def backward_target(batch: TransitionBatch, nets: Nets, cfg: NablaDBConfig, sampler: str, eta: float,
                    std: torch.Tensor) -> torch.Tensor:
    """T(x, x'): the detached target for ∇log F̃(x) under the configured estimator."""
    step_fn = get_transition(sampler)
    x, x_next, idx = batch.x, batch.x_next, batch.step_idx
    a_t, a_n = batch.alpha_bar_t, batch.alpha_bar_next

    def pretrained_mean(z):
        return step_fn(z, nets.pretrained_eps(z, idx), a_t, a_n, eta).mean

    if cfg.backward_estimator == "sampled":
        def policy_mean(z):
            return step_fn(z, nets.policy_eps(z, idx), a_t, a_n, eta).mean

        score_pol = backward_score(x, x_next, policy_mean, std)
        score_pre = backward_score(x, x_next, pretrained_mean, std)
        return -(score_pol - cfg.pretrained_strength * score_pre).detach()
    if cfg.backward_estimator == "stein":
        with torch.no_grad():
            flow_bar = next_flow(batch, nets.target_flow(x_next, idx + 1), cfg.flow_output)
        return mean_vjp(x, flow_bar, pretrained_mean).detach()
    if cfg.backward_estimator == "stein_lambda":
        if batch.stein_target is None:
            raise ValueError("backward_estimator=stein_lambda needs batch.stein_target "
                             "(compute it with stein_lambda_targets over whole trajectories)")
        return batch.stein_target.detach()
    raise ValueError(f"backward_estimator {cfg.backward_estimator!r} is not one of sampled, stein, stein_lambda")


def terminal_loss(batch: TransitionBatch, nets: Nets, cfg: NablaDBConfig) -> torch.Tensor:
    """‖g_φ(x_N)‖² on the rows whose x_next is terminal (in the configured units)."""
    last = batch.is_last
    if not bool(last.any()):
        return torch.zeros((), dtype=batch.x.dtype)
    xN, idxN, aN = batch.x_next[last], batch.step_idx[last] + 1, batch.alpha_bar_next[last]
    corr = flow_value(nets.flow(xN, idxN), torch.zeros_like(xN), aN, cfg.flow_output)
    if cfg.units == "eps":
        corr = corr * expand_like((1 - aN).sqrt(), xN)
    return cfg.terminal_loss_scale * _msq(corr)


def stein_lambda_targets(states: torch.Tensor, alpha_bar: torch.Tensor, pretrained_eps: EpsFn,
                         target_flow_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         terminal_flow: torch.Tensor, lam: float, sampler: str = "ddim",
                         eta: float = 1.0, first_step: int = 0) -> torch.Tensor:
    """λ-return Stein targets T_i for ∇log F̃(x_i), i = first_step … N−1, along whole trajectories.

        T_N = β∇log R(x_N),   T_i = J_μ#(x_i)ᵀ [ (1−λ) ∇log F̄(x_{i+1}) + λ T_{i+1} ]

    λ = 0 is the one-step (bootstrapped) Stein target; λ = 1 the full-horizon one (no
    bootstrapping: the reward gradient carried back through the pretrained means along the sampled
    path). Each step is one VJP through the pretrained mean. states: (B, N+1, *S);
    target_flow_value(x, state_idx) -> ∇log F̄ (guess + Polyak g_φ). Returns (B, N − first_step, *S).
    """
    step_fn = get_transition(sampler)
    B, n_states = states.shape[:2]
    N = n_states - 1
    T_next = terminal_flow
    out = []
    for i in range(N - 1, first_step - 1, -1):
        idx = torch.full((B,), i, dtype=torch.long, device=states.device)
        a_t = alpha_bar[i].expand(B).to(states.dtype)
        a_n = alpha_bar[i + 1].expand(B).to(states.dtype)
        if i + 1 == N:
            v = T_next
        else:
            with torch.no_grad():
                f_bar = target_flow_value(states[:, i + 1], idx + 1)
            v = (1 - lam) * f_bar + lam * T_next
        T_i = mean_vjp(states[:, i], v, lambda z: step_fn(z, pretrained_eps(z, idx), a_t, a_n, eta).mean)
        out.append(T_i.detach())
        T_next = T_i
    out.reverse()
    return torch.stack(out, dim=1)
