"""The baselines of ALGORITHM.md §4 on the exact GMM benchmark, beside run.Trainer (residual ∇-DB).

Same problem (GMMProblem: analytic pretrained ε#, SD schedule, exact reward), same policy (ε# plus a
zero-initialised TimeMLP residual), same optimiser settings (`optim`), and the same loss functions
as the diffusion path (learner/objectives/{draft,refl,ddpo,residual_db}.py). Each trainer has
run.Trainer's interface: `update() -> dict` of loss terms, `policy_eps(x, idx)`, `flow_error()`
(empty for methods without a flow; residual DB's ∇ of its learned scalar log-flow otherwise).

The reward of the GMM is log R(x) in closed form and differentiable (float32 here); β is the spec's
`beta` (the target is p#·R^β with that β), so `objective.reward_scale` is not read here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nablagfn.common.config import METHODS, DDPOConfig, DraftConfig, ReflConfig, ResidualDBConfig
from nablagfn.common.config_io import require
from nablagfn.learner.objectives.ddpo import per_prompt_advantages, ppo_clip_loss, transition_log_prob
from nablagfn.learner.objectives.draft import draft_loss, renoise, rollout_last_steps
from nablagfn.learner.objectives.refl import draw_stop_steps, refl_x0
from nablagfn.learner.objectives.residual_db import log_flow_value, next_log_flow, residual_db_loss

from . import exact
from .models import TimeMLP
from .run import GMMBenchConfig, GMMProblem, flow_error_by_band, kept_transitions

ALL_METHODS = METHODS  # residual-nabla-db (run.Trainer) first, then the baselines
BASELINES = tuple(m for m in METHODS if m != "residual-nabla-db")

# Per-method defaults under the config file and the command line (cli.py layers them first): each
# baseline runs in a few minutes at most on one CPU thread and has converged (collapsed) by then.
# Measured on gmm_ring8: the reward maximisers collapse onto the best mode within ~200 updates at
# lr 1e-4; at lr 1e-3 DRaFT-1 collapses within 30 updates and then diverges (NaN) near update 90.
# `optim` is given whole: a partial section would reset the others to OptimConfig's defaults.
_SLOW = {"lr": 1e-4, "flow_lr": 1e-3, "weight_decay": 0.0, "flow_weight_decay": 0.0}
METHOD_DEFAULTS: dict[str, dict] = {
    "draft": {"updates": 600, "eval_every": 100, "optim": dict(_SLOW)},
    "draft-lv": {"updates": 600, "eval_every": 100, "optim": dict(_SLOW)},
    "refl": {"updates": 600, "eval_every": 100, "optim": dict(_SLOW)},
    "ddpo": {"updates": 400, "eval_every": 100, "optim": dict(_SLOW, lr=1e-3)},
    "residual-db": {"updates": 1000, "eval_every": 250, "optim": dict(_SLOW, lr=1e-3)},
}


@dataclass
class GMMMethodsConfig(GMMBenchConfig):
    """GMMBenchConfig plus the baselines' option sections (the same dataclasses as TrainConfig's)."""

    draft: DraftConfig = field(default_factory=DraftConfig)
    refl: ReflConfig = field(default_factory=ReflConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    residual_db: ResidualDBConfig = field(default_factory=ResidualDBConfig)

    def validate(self) -> None:
        super().validate()
        require(self.method in ALL_METHODS, "method", f"{self.method!r} is not one of {list(ALL_METHODS)}")


class _PolicyTrainer:
    """ε_θ = ε# + residual(x, t) with AdamW on the residual (and `extra` parameter groups)."""

    def __init__(self, problem: GMMProblem, cfg: GMMBenchConfig, extra: list[dict] | None = None):
        self.p, self.cfg = problem, cfg
        torch.manual_seed(cfg.seed)
        self.residual = TimeMLP(problem.spec.dim, cfg.hidden, cfg.layers, cfg.emb_dim)
        o = cfg.optim
        groups = [{"params": self.residual.parameters(), "lr": o.lr, "weight_decay": o.weight_decay}]
        self.opt = torch.optim.AdamW(groups + (extra or []), betas=tuple(o.betas))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.beta = problem.spec.beta

    def policy_eps(self, x, idx):
        return self.p.pretrained_eps(x, idx) + self.residual(x, self.p.state_t[idx])

    def log_reward(self, x):
        return exact.log_reward(self.p.spec, x)

    def flow_error(self, n: int = 512) -> dict:
        """No flow, no flow error (DRaFT, ReFL, DDPO)."""
        return {}

    def step(self, loss: torch.Tensor, nets: list[nn.Module]) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            for net in nets:
                torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()

    @torch.no_grad()
    def sample_prefix(self, n: int, steps: int) -> torch.Tensor:
        """The policy's state after `steps` of the N steps, from fresh noise (no graph)."""
        p = self.p
        x = torch.randn(n, p.spec.dim, generator=self.gen, dtype=p.dtype)
        for i in range(steps):
            st = p.step(x, self.policy_eps(x, torch.full((n,), i, dtype=torch.long)), i)
            x = st.mean + st.std * torch.randn(x.shape, generator=self.gen, dtype=p.dtype)
        return x

    def reward_step(self, x: torch.Tensor, log_key: str = "log_reward") -> dict:
        """One optimizer step on −β · mean log R(x) (DRaFT's loss, and ReFL's at x = x̂₀); the logs."""
        log_r = self.log_reward(x)
        loss = draft_loss(log_r, self.beta)
        self.step(loss, [self.residual])
        return {"loss": float(loss.detach()), log_key: float(log_r.detach().mean())}


class DraftTrainer(_PolicyTrainer):
    """DRaFT-K: no-grad sampling to state N−K, the last K steps with θ's graph, −β log R(x_N)."""

    def update(self) -> dict:
        p, B, N = self.p, self.cfg.batch_trajectories, self.p.schedule.num_steps
        K = min(self.cfg.draft.k, N)
        x = self.sample_prefix(B, N - K)
        z = torch.randn((B, K, p.spec.dim), generator=self.gen, dtype=p.dtype)
        return self.reward_step(rollout_last_steps(x, N - K, z, self.policy_eps, p.alpha_bar, p.sampler.kind,
                                                   p.sampler.eta))


class DraftLVTrainer(_PolicyTrainer):
    """DRaFT-LV: the final sample re-noised to state N−1 `lv_draws` times, one step with graph each."""

    def update(self) -> dict:
        p, B, N = self.p, self.cfg.batch_trajectories, self.p.schedule.num_steps
        n = self.cfg.draft.lv_draws
        xN = self.sample_prefix(B, N).repeat(n, 1)
        eps = torch.randn(xN.shape, generator=self.gen, dtype=p.dtype)
        x_prev = renoise(xN, p.alpha_bar[N - 1], p.alpha_bar[N], eps)
        z = torch.randn((B * n, 1, p.spec.dim), generator=self.gen, dtype=p.dtype)
        return self.reward_step(rollout_last_steps(x_prev, N - 1, z, self.policy_eps, p.alpha_bar, p.sampler.kind,
                                                   p.sampler.eta))


class ReflTrainer(_PolicyTrainer):
    """ReFL: stop at a uniform late state s, x̂₀ from one policy call with graph, −β log R(x̂₀)."""

    def update(self) -> dict:
        p, B, N = self.p, self.cfg.batch_trajectories, self.p.schedule.num_steps
        stop = draw_stop_steps(B, N, self.cfg.refl.min_step_fraction, self.gen)
        states, _ = p.sample(self.policy_eps, B, self.gen)  # no graph; the rows are read at their stop
        x = states[torch.arange(B), stop]
        return self.reward_step(refl_x0(x, self.policy_eps(x, stop), p.alpha_bar[stop]), "log_reward_x0")


class DDPOTrainer(_PolicyTrainer):
    """DDPO: PPO-clip on the kept steps' log-prob ratio; one prompt, so the batch normalises rewards."""

    def update(self) -> dict:
        p, cfg, B, N = self.p, self.cfg, self.cfg.batch_trajectories, self.p.schedule.num_steps
        states, eps_beh = p.sample(self.policy_eps, B, self.gen)
        log_r = self.log_reward(states[:, -1])
        adv = per_prompt_advantages(self.beta * log_r, [""] * B, cfg.ddpo.min_count)
        _, rows, idx = kept_transitions(B, N, cfg.subsample, self.gen)
        x, x_next = states[rows, idx], states[rows, idx + 1]
        a_t, a_n = p.alpha_bar[idx], p.alpha_bar[idx + 1]
        old = transition_log_prob(x, x_next, eps_beh[rows, idx], a_t, a_n, p.sampler.kind, p.sampler.eta)
        logs = []
        for _ in range(cfg.ddpo.inner_epochs):
            new = transition_log_prob(x, x_next, self.policy_eps(x, idx), a_t, a_n, p.sampler.kind, p.sampler.eta)
            terms = ppo_clip_loss(new, old, adv[rows], cfg.ddpo.clip, cfg.ddpo.adv_clip_max)
            self.step(terms["loss"], [self.residual])
            logs.append({k: float(v.detach()) for k, v in terms.items()})
        out = {k: sum(lg[k] for lg in logs) / len(logs) for k in logs[0]}
        out["log_reward"] = float(log_r.detach().mean())
        return out


def scalar_time_mlp(dim: int, hidden: int, layers: int, emb_dim: int) -> TimeMLP:
    """A TimeMLP with one (zero-initialised) output: the scalar log-flow f_ψ(x, t)."""
    net = TimeMLP(dim, hidden, layers, emb_dim)
    net.out = nn.Linear(hidden, 1)
    nn.init.zeros_(net.out.weight)
    nn.init.zeros_(net.out.bias)
    return net


class ResidualDBTrainer(_PolicyTrainer):
    """Zeroth-order residual DB: kept transitions, log-prob residual, scalar log-flow f_ψ (+ the guess)."""

    def __init__(self, problem: GMMProblem, cfg: GMMBenchConfig):
        torch.manual_seed(cfg.seed + 1)
        self.log_flow = scalar_time_mlp(problem.spec.dim, cfg.hidden, cfg.layers, cfg.emb_dim)
        o = cfg.optim
        super().__init__(problem, cfg, [{"params": self.log_flow.parameters(), "lr": o.flow_lr,
                                         "weight_decay": o.flow_weight_decay}])

    def guess(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """β log R(x̂₀#(x)) with the pretrained one-step prediction, or None (guess=none)."""
        if self.cfg.residual_db.guess == "none":
            return None
        return self.beta * self.log_reward(self.p.pretrained_x0(x, idx))

    def log_flow_at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return log_flow_value(self.log_flow(x, self.p.state_t[idx]).squeeze(-1), self.guess(x, idx))

    def update(self) -> dict:
        p, cfg, B, N = self.p, self.cfg, self.cfg.batch_trajectories, self.p.schedule.num_steps
        states, _ = p.sample(self.policy_eps, B, self.gen)
        _, rows, idx = kept_transitions(B, N, cfg.subsample, self.gen)
        x, x_next = states[rows, idx], states[rows, idx + 1]
        a_t, a_n = p.alpha_bar[idx], p.alpha_bar[idx + 1]
        kind, eta = p.sampler.kind, p.sampler.eta
        lp_pol = transition_log_prob(x, x_next, self.policy_eps(x, idx), a_t, a_n, kind, eta)
        with torch.no_grad():
            lp_pre = transition_log_prob(x, x_next, p.pretrained_eps(x, idx), a_t, a_n, kind, eta)
            g_next = self.guess(x_next, idx + 1)  # unused on last rows (the terminal flow is exact)
        is_last = idx == N - 1
        terminal = self.beta * self.log_reward(x_next)
        raw_next = self.log_flow(x_next, p.state_t[idx + 1]).squeeze(-1)
        lf_next = next_log_flow(raw_next, g_next, terminal, is_last)
        terms = residual_db_loss(lp_pol, lp_pre, self.log_flow_at(x, idx), lf_next,
                                 cfg.objective.pretrained_strength)
        self.step(terms["loss"], [self.residual, self.log_flow])
        return {k: float(v.detach()) for k, v in terms.items()}

    def flow_error(self, n: int = 512) -> dict:
        """∇_x of the learned log F̃ against the exact ∇log F̃, per noise band (run.flow_error_by_band)."""
        def learned_grad(x, idx):
            z = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.log_flow_at(z, idx).sum(), z)
            return g
        return flow_error_by_band(self.p, self.policy_eps, learned_grad, self.cfg.seed, n)


TRAINERS = {"draft": DraftTrainer, "draft-lv": DraftLVTrainer, "refl": ReflTrainer, "ddpo": DDPOTrainer,
            "residual-db": ResidualDBTrainer}


def make_baseline_trainer(problem: GMMProblem, cfg: GMMBenchConfig):
    """The trainer of baseline `cfg.method` (see TRAINERS)."""
    try:
        cls = TRAINERS[cfg.method]
    except KeyError:
        raise ValueError(f"method {cfg.method!r} is not a baseline; known: {list(TRAINERS)}") from None
    return cls(problem, cfg)


# ------------------------------------------------------------------------ `--method all` comparison
TABLE_COLUMNS = (("method", "method", "{}"), ("tv", "TV", "{:.3f}"), ("mean_log_reward", "mean log R", "{:.3f}"),
                 ("target_mean_log_reward", "target log R", "{:.3f}"), ("wall_seconds", "wall s", "{:.0f}"))


def comparison_row(summary: dict) -> dict:
    """One method's line of the comparison, from run_gmm_bench's summary."""
    return {"method": summary["method"], "tv": summary["tv"], "mean_log_reward": summary["mean_log_reward"],
            "target_mean_log_reward": summary["target_mean_log_reward"], "wall_seconds": summary["wall_seconds"],
            "updates": summary["updates"], "empirical_weights": summary["empirical_weights"]}


def format_table(rows: list[dict], references: dict | None = None) -> str:
    """A fixed-width text table of the rows (TABLE_COLUMNS), then the pretrained sampler and the
    exact-flow floor as reference lines when given ({"pretrained": measure(...), "exact_flow": ...})."""
    head = [h for _, h, _ in TABLE_COLUMNS]
    body = [[fmt.format(r[k]) for k, _, fmt in TABLE_COLUMNS] for r in rows]
    target = rows[0]["target_mean_log_reward"] if rows else float("nan")
    for name, ref in (references or {}).items():
        body.append([f"({name})", f"{ref['tv']:.3f}", f"{ref['mean_log_reward']:.3f}", f"{target:.3f}", "-"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
