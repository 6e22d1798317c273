"""The GMM benchmark recipe: train a method on an exact target, then measure it.

Loop (per update): sample trajectories with the current policy → subsample kept transitions →
reward gradients and flow guesses → the method's loss (the same objective code as the diffusion
path) → Adam step → Polyak update of the target g_φ. Measurement: mode-weight TV and mean
log-reward of fresh samples against the closed-form target, the same for the pretrained sampler
and the exact-flow sampler (the floor), and the learned flow's error per noise band.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from nablagfn.common.config import NablaDBConfig, OptimConfig, SamplerConfig, SubsampleConfig
from nablagfn.common.config_io import require
from nablagfn.common.prediction import x0_from_eps
from nablagfn.common.samplers import get_transition
from nablagfn.common.schedule import SD_SCHEDULER_CONFIG, SamplingSchedule, make_schedule
from nablagfn.common.subsample import subsample_steps
from nablagfn.learner.objectives.flow_param import flow_guess, flow_value, gamma_t
from nablagfn.learner.objectives.nabla_db import (Nets, TransitionBatch, log_flow_targets, log_ratio,
                                                  nabla_db_loss, stein_lambda_targets)

from . import exact
from .models import TimeMLP
from .spec import GMMSpec

BANDS = (("early", 0.0, 1 / 3), ("mid", 1 / 3, 2 / 3), ("late", 2 / 3, 1.0))


@dataclass
class GMMBenchConfig:
    """Defaults: what measured best on the public specs (see the issue notes)."""

    method: str = "residual-nabla-db"
    model_family: str = "ddpm"  # "ddpm", or "flow": a rectified-flow pretrained model (flow_problem.py)
    seed: int = 0
    updates: int = 3000
    batch_trajectories: int = 64
    hidden: int = 256
    layers: int = 3
    emb_dim: int = 64
    eval_every: int = 500
    threads: int = 1  # torch intra-op threads: tiny MLPs run fastest on one
    oracle_flow: bool = False  # diagnostic: the exact ∇log F̃ as the guess (use with objective.no_flow)
    oracle_policy: bool = False  # diagnostic: the policy fixed at the exact-flow sampler; only g_φ learns
    policy_ema: float = 0.995  # decay of the policy-weight average evaluation samples from (0 = off; warm-up in WeightEMA)
    eval_samples: int = 4096
    final_samples: int = 8192
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(guidance_scale=0.0))
    subsample: SubsampleConfig = field(default_factory=SubsampleConfig)
    # the residual ∇-DB layout that measured best here (ALGORITHM.md §2a + the value term, see
    # learner/objectives/nabla_db.py): g_φ = ∇Φ with the log-space DB value term fitted log-mean-exp
    objective: NablaDBConfig = field(default_factory=lambda: NablaDBConfig(
        flow_potential=True, flow_output="score", value_loss_scale=1.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.0, flow_weight_decay=0.0))

    def validate(self) -> None:
        require(self.updates >= 0, "updates", "must be >= 0")
        require(self.batch_trajectories >= 1, "batch_trajectories", "must be >= 1")
        require(self.final_samples >= 4096, "final_samples", "must be >= 4096")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self.threads >= 1, "threads", "must be >= 1")
        require(0 <= self.policy_ema < 1, "policy_ema", "must be in [0, 1)")


class GMMProblem:
    """The analytic pretrained model, the schedule and the reward of one spec, as tensor callables."""

    def __init__(self, spec: GMMSpec, sampler: SamplerConfig, dtype=torch.float32):
        self.spec = spec
        self.sampler = sampler
        self.schedule: SamplingSchedule = make_schedule(SD_SCHEDULER_CONFIG, sampler.num_steps, sampler.kind)
        self.alpha_bar = self.schedule.alpha_bar.to(dtype)
        self.state_t = self.schedule.state_timesteps()
        self.step_fn = get_transition(sampler.kind)
        self.dtype = dtype

    def pretrained_eps(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return exact.pretrained_eps(self.spec, x, self.alpha_bar[idx])

    def pretrained_x0(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x0_from_eps(self.pretrained_eps(x, idx), x, self.alpha_bar[idx])

    def step(self, x, eps, i: int):
        B = x.shape[0]
        return self.step_fn(x, eps, self.alpha_bar[i].expand(B), self.alpha_bar[i + 1].expand(B), self.sampler.eta)

    @torch.no_grad()
    def sample(self, eps_fn, n: int, gen: torch.Generator, mean_shift=None):
        """Trajectories (n, N+1, d) and the behaviour ε (n, N, d); mean_shift(x_mean, i) adds to μ."""
        N = self.schedule.num_steps
        x = torch.randn(n, self.spec.dim, generator=gen, dtype=self.dtype)
        states, eps_all = [x], []
        for i in range(N):
            idx = torch.full((n,), i, dtype=torch.long)
            eps = eps_fn(x, idx)
            st = self.step(x, eps, i)
            mean = st.mean if mean_shift is None else st.mean + mean_shift(st, i)
            x = mean + st.std * torch.randn(x.shape, generator=gen, dtype=self.dtype)
            states.append(x)
            eps_all.append(eps)
        return torch.stack(states, 1), torch.stack(eps_all, 1)


def kept_transitions(batch: int, num_steps: int, sub: SubsampleConfig, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keep (B, K) drawn by `subsample_steps`, and each kept transition's (trajectory, step) as
    flat rows (B·K,), trajectory-major."""
    keep = subsample_steps(batch, num_steps, sub.timestep_fraction, sub.low_variance, sub.keep_last, gen)
    K = keep.shape[1]
    return keep, torch.arange(batch)[:, None].expand(batch, K).reshape(-1), keep.reshape(-1)


def exact_flow_shift(problem: GMMProblem):
    """The exact h-transform as a Gaussian mean shift σ² ∇log F̃_{t'}(μ#) (ALGORITHM.md §2a item 5)."""
    def shift(st, i):
        n = st.mean.shape[0]
        g = exact.grad_log_flow(problem.spec, st.mean.double(), problem.schedule.alpha_bar[i + 1].expand(n))
        return (st.std**2 * g.to(st.mean.dtype))
    return shift


def measure(problem: GMMProblem, samples: torch.Tensor) -> dict:
    spec = problem.spec
    w = exact.mode_weights(spec, samples)
    tw = exact.target_weights(spec)
    return {"tv": exact.total_variation(w, tw), "empirical_weights": w.tolist(),
            "mean_log_reward": float(exact.log_reward(spec, samples.double()).mean())}


def flow_error_by_band(problem: GMMProblem, policy_eps, learned_grad, seed: int, n: int = 512) -> dict:
    """RMS of (learned − exact) ∇log F̃ in ε units (× √(1−ᾱ_t)) per noise band, on n policy
    trajectories; learned_grad(x, state_idx) is the method's flow gradient."""
    p = problem
    states, _ = p.sample(policy_eps, n, torch.Generator().manual_seed(seed + 12345))
    N = p.schedule.num_steps
    out = {}
    for name, lo, hi in BANDS:
        errs = []
        for i in [i for i in range(N) if lo <= i / N < hi]:
            x = states[:, i]
            learned = learned_grad(x, torch.full((n,), i, dtype=torch.long)).double()
            true = exact.grad_log_flow(p.spec, x.double(), p.schedule.alpha_bar[i].expand(n))
            errs.append(((learned - true) ** 2).sum(1).mean() * (1 - p.schedule.alpha_bar[i]))
        out[name] = float(torch.stack(errs).mean().sqrt())
    return out


class Trainer:
    """Holds the policy residual, g_φ, its Polyak copy and the optimiser for one GMM run."""

    def __init__(self, problem: GMMProblem, cfg: GMMBenchConfig):
        self.p, self.cfg = problem, cfg
        torch.manual_seed(cfg.seed)
        d = problem.spec.dim
        self.residual = TimeMLP(d, cfg.hidden, cfg.layers, cfg.emb_dim)
        # g_φ: a vector field, or (objective.flow_potential) the x-gradient of a scalar potential Φ
        self.flow = TimeMLP(d, cfg.hidden, cfg.layers, cfg.emb_dim, out_dim=1 if cfg.objective.flow_potential else d)
        self.flow_bar = copy.deepcopy(self.flow).requires_grad_(False)
        o = cfg.optim
        self.opt = torch.optim.AdamW([
            {"params": self.residual.parameters(), "lr": o.lr, "weight_decay": o.weight_decay},
            {"params": self.flow.parameters(), "lr": o.flow_lr, "weight_decay": o.flow_weight_decay}],
            betas=tuple(o.betas))
        self.gen = torch.Generator().manual_seed(cfg.seed)

    # -- networks as (x, state_idx) callables -------------------------------------------------
    def policy_eps(self, x, idx):
        if self.cfg.oracle_policy:
            return self.oracle_policy_eps(x, idx)
        return self.p.pretrained_eps(x, idx) + self.residual(x, self.p.state_t[idx])

    def oracle_policy_eps(self, x, idx):
        """ε of the exact-flow sampler: μ = μ# + σ² ∇log F̃_{t'}(μ#), i.e. ε# + σ²/b · ∇log F̃."""
        p = self.p
        eps = p.pretrained_eps(x, idx)
        with torch.no_grad():
            st = p.step_fn(x, eps, p.alpha_bar[idx], p.alpha_bar[idx + 1], p.sampler.eta)
            g = exact.grad_log_flow(p.spec, st.mean.double(), p.schedule.alpha_bar[idx + 1]).to(x.dtype)
        return eps + (st.std**2 / st.eps_coef * g).detach() + 0 * self.residual(x, p.state_t[idx])

    def raw_flow(self, net, x, idx, create_graph: bool = False):
        """g_φ's output at (x, state idx): the net itself, or ∇_x Φ for a scalar potential."""
        t = self.p.state_t[idx]
        if not self.cfg.objective.flow_potential:
            return net(x, t)
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(net(z, t).sum(), z, create_graph=create_graph)
        return g

    def potential(self, net, x, idx):
        return net(x, self.p.state_t[idx]).squeeze(-1)

    def nets(self) -> Nets:
        pot = (lambda x, i: self.potential(self.flow, x, i)) if self.cfg.objective.flow_potential else None
        return Nets(policy_eps=self.policy_eps, pretrained_eps=self.p.pretrained_eps,
                    flow=lambda x, i: self.raw_flow(self.flow, x, i, create_graph=True),
                    target_flow=lambda x, i: self.raw_flow(self.flow_bar, x, i), potential=pot)

    def x0_fn(self, idx):
        """z ↦ x̂₀(z) of the guess's source model at state idx."""
        if self.cfg.objective.guess_x0_source == "pretrained":
            return lambda z: self.p.pretrained_x0(z, idx)
        a = self.p.alpha_bar[idx]
        return lambda z: x0_from_eps(self.policy_eps(z, idx), z, a)

    @torch.no_grad()
    def guess_value(self, x, idx):
        """β γ_t log R(x̂₀(x)): the value whose x-gradient is the guess (0 for guess_x0_source=none)."""
        ob = self.cfg.objective
        if ob.guess_x0_source == "none":
            return torch.zeros(x.shape[0], dtype=x.dtype)
        g = gamma_t(self.p.alpha_bar[idx], ob.gamma)
        return ob.reward_scale * g * exact.log_reward(self.p.spec, self.x0_fn(idx)(x).double()).to(x.dtype)

    @torch.no_grad()
    def value_targets(self, states, eps_beh, xN_log_r):
        """(B, N) λ-return targets for log F̃ at states 0 … N−1 (objective.value_lambda)."""
        p, ob = self.p, self.cfg.objective
        B, N = eps_beh.shape[:2]
        ell = torch.empty(B, N, dtype=states.dtype)
        boot = torch.zeros(B, N + 1, dtype=states.dtype)
        for i in range(N):
            idx = torch.full((B,), i, dtype=torch.long)
            x, x_next = states[:, i], states[:, i + 1]
            pol = p.step(x, eps_beh[:, i], i)
            pre = p.step(x, p.pretrained_eps(x, idx), i)
            ell[:, i] = log_ratio(x_next, pol.mean, pre.mean, pre.std, ob.pretrained_strength)
            if ob.value_lambda < 1:
                boot[:, i] = self.guess_value(x, idx) + self.potential(self.flow_bar, x, idx)
        return log_flow_targets(ell, ob.reward_scale * xN_log_r, boot, ob.value_lambda)

    def guess(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """β γ_t ∇_x log R(x̂₀(x)) with x̂₀ from the configured model (detached)."""
        ob = self.cfg.objective
        if self.cfg.oracle_flow:
            return exact.grad_log_flow(self.p.spec, x.double(), self.p.schedule.alpha_bar[idx]).to(x.dtype)
        if ob.guess_x0_source == "none":
            return torch.zeros_like(x)
        a = self.p.alpha_bar[idx]
        x0_fn = self.x0_fn(idx)
        with torch.no_grad():
            x0 = x0_fn(x)
        grad_x0 = exact.grad_log_reward(self.p.spec, x0)
        return flow_guess(x, grad_x0, a, ob.reward_scale, ob.gamma, x0_fn, ob.x0_grad)

    def flow_estimate(self, x, idx, net=None):
        net = net or self.flow
        return flow_value(self.raw_flow(net, x, idx), self.guess(x, idx), self.p.alpha_bar[idx],
                          self.cfg.objective.flow_output)

    # -- one update -----------------------------------------------------------------------------
    def update(self) -> dict:
        cfg, p, ob = self.cfg, self.p, self.cfg.objective
        B, N = cfg.batch_trajectories, p.schedule.num_steps
        states, eps_beh = p.sample(self.policy_eps, B, self.gen)
        xN = states[:, -1]
        terminal = ob.reward_scale * exact.grad_log_reward(p.spec, xN.double()).to(xN.dtype)
        keep, rows, idx = kept_transitions(B, N, cfg.subsample, self.gen)
        x, x_next = states[rows, idx], states[rows, idx + 1]
        stein_target = None
        if ob.backward_estimator == "stein_lambda" and not ob.no_flow:
            first = int(keep.min())
            flow_bar_fn = lambda z, i: self.flow_estimate(z, i, self.flow_bar)  # noqa: E731
            T = stein_lambda_targets(states, p.alpha_bar, p.pretrained_eps, flow_bar_fn, terminal,
                                     ob.stein_lambda, p.sampler.kind, p.sampler.eta, first_step=first)
            stein_target = T[rows, idx - first]
        value = {}
        if ob.value_loss_scale > 0:
            V = self.value_targets(states, eps_beh, exact.log_reward(p.spec, xN.double()).to(xN.dtype))
            value = {"log_flow_target": V[rows, idx], "guess_value": self.guess_value(x, idx)}
        fwd = {}
        if ob.forward_point == "pretrained_mean":
            with torch.no_grad():
                a_t, a_n = p.alpha_bar[idx], p.alpha_bar[idx + 1]
                mu = p.step_fn(x, p.pretrained_eps(x, idx), a_t, a_n, p.sampler.eta).mean
            fwd = {"fwd_point": mu, "fwd_guess": self.guess(mu, idx + 1),
                   "fwd_terminal_flow": ob.reward_scale * exact.grad_log_reward(p.spec, mu.double()).to(mu.dtype)}
        batch = TransitionBatch(
            x=x, x_next=x_next, step_idx=idx, alpha_bar_t=p.alpha_bar[idx], alpha_bar_next=p.alpha_bar[idx + 1],
            is_last=idx == N - 1, eps_behaviour=eps_beh[rows, idx], guess=self.guess(x, idx),
            guess_next=self.guess(x_next, idx + 1), terminal_flow=terminal[rows], stein_target=stein_target, **fwd, **value)
        return self.optimize(batch)

    def optimize(self, batch: TransitionBatch) -> dict:
        """One step on the ∇-DB loss of `batch`: AdamW with per-network gradient clipping, then the
        Polyak update of ḡ; the loss terms. (The distributed testbed calls it with rebuilt batches.)"""
        cfg, p, ob = self.cfg, self.p, self.cfg.objective
        terms = nabla_db_loss(batch, self.nets(), ob, p.sampler.kind, p.sampler.eta)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.residual.parameters(), cfg.optim.grad_clip)
            torch.nn.utils.clip_grad_norm_(self.flow.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for pb, pf in zip(self.flow_bar.parameters(), self.flow.parameters()):
                pb.lerp_(pf, ob.target_flow_tau)
        return {k: float(v.detach()) for k, v in terms.items()}

    # -- diagnostics ----------------------------------------------------------------------------
    def flow_error(self, n: int = 512) -> dict:
        """The learned ∇log F̃ (guess + g_φ) against the exact one, per noise band (flow_error_by_band)."""
        with torch.no_grad():
            return flow_error_by_band(self.p, self.policy_eps, self.flow_estimate, self.cfg.seed, n)
