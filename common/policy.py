"""The diffusion policy as callables of (x, state index), and the sampling-side flow queries.

Shared by the sampler actors (actors/) and the learner (learner/), which must not import each
other: `PolicyCallables` wraps the Denoiser (policy ε with the LoRA on, pretrained ε# with it off,
both with CFG), g_φ and its Polyak copy; `plan_flow_queries` is what a sampler computes right after
sampling (ALGORITHM.md §3): the states whose flow value the update reads (`needed_states`) and the
x̂₀ the reward is taken at, under no_grad — the pretrained model's x̂₀ is one batched UNet call with
the adapter disabled, the policy's comes with ε. The learner binds these to the loss in
learner/nabla_db_step.py.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import TrainConfig
from .prediction import x0_from_eps
from .samplers import get_transition
from .schedule import SamplingSchedule
from .subsample import first_stop_step
from .trajectories import Trajectories

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NABLA_DB = "residual-nabla-db"  # the method with a flow g_φ; the others are baselines


def chunks(n: int, size: int):
    """Slices of range(n), `size` at a time."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class RowCond:
    """Per-row text embeddings for callables of (x, state_idx) that see either all R rows of a
    batch or, in `terminal_loss`, only its last-transition rows. The two are told apart by their
    row count (they differ unless every row is a last one, when they are the same rows)."""

    def __init__(self, cond: torch.Tensor, is_last: Optional[torch.Tensor] = None):
        self.by_rows = {int(cond.shape[0]): cond}
        if is_last is not None:
            self.by_rows.setdefault(int(is_last.sum()), cond[is_last])

    def __call__(self, n: int) -> torch.Tensor:
        try:
            return self.by_rows[n]
        except KeyError:
            raise ValueError(f"no text embeddings for a batch of {n} rows "
                             f"(have {sorted(self.by_rows)})") from None


class PolicyCallables:
    """The diffusion policy's networks as callables of (x, state_idx) for the objective.

    policy ε = the UNet with LoRA on and CFG; pretrained ε# = the same UNet, adapters disabled;
    g_φ = FlowNet's raw output (online, or the Polyak copy `flow_bar`). state_idx indexes the
    schedule's states 0..N; the model timestep of state N is 0.
    """

    def __init__(self, denoiser, flow_net, schedule: SamplingSchedule, uncond_emb: Optional[torch.Tensor],
                 guidance_scale: float, device: torch.device):
        self.denoiser = denoiser
        self.flow_net = flow_net
        self.flow_bar = None if flow_net is None else copy.deepcopy(flow_net).requires_grad_(False)
        self.schedule = schedule
        self.uncond = None if uncond_emb is None else uncond_emb.to(device)
        self.guidance_scale = float(guidance_scale)
        self.device = device
        self.state_t = schedule.state_timesteps().to(device)
        self.alpha_bar = schedule.alpha_bar.to(device=device, dtype=torch.float32)
        self.potential_flow = False  # g_φ = ∇_x Φ (objective.flow_potential; set by the learner)

    def eps(self, cond: torch.Tensor | RowCond, adapter: bool) -> EpsFn:
        rc = cond if isinstance(cond, RowCond) else RowCond(cond)

        def fn(x, idx):
            return self.denoiser.eps(x, self.state_t[idx], rc(x.shape[0]), self.uncond,
                                     self.guidance_scale, adapter=adapter)
        return fn

    def flow(self, cond: torch.Tensor | RowCond, target: bool = False) -> EpsFn:
        """g_φ(x, idx): FlowNet's output, or with `potential_flow` ∇_x Φ of Φ = Σ FlowNet(x) (the
        online net keeps the graph for the parameters: a double backward, run with the MATH attention)."""
        rc = cond if isinstance(cond, RowCond) else RowCond(cond)
        net = self.flow_bar if target else self.flow_net
        if net is None:
            return lambda x, idx: torch.zeros_like(x)
        if not self.potential_flow:
            return lambda x, idx: net(x, self.state_t[idx], rc(x.shape[0]))
        phi = self.potential(rc, target)

        def grad_phi(x, idx):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                z = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(phi(z, idx).sum(), z, create_graph=not target)
            return g
        return grad_phi

    def potential(self, cond: torch.Tensor | RowCond, target: bool = False):
        """Φ(x, idx) per row (B,): the scalar log-flow correction, the sum of FlowNet's output map."""
        rc = cond if isinstance(cond, RowCond) else RowCond(cond)
        net = self.flow_bar if target else self.flow_net
        return lambda x, idx: net(x, self.state_t[idx], rc(x.shape[0])).flatten(1).sum(1)

    def x0_fn(self, source: str, cond: torch.Tensor, state_idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """z ↦ x̂₀(z) of the `source` model ("pretrained" or "policy") at the rows' states."""
        eps = self.eps(cond, adapter=(source == "policy"))
        a = self.alpha_bar[state_idx]
        return lambda z: x0_from_eps(eps(z, state_idx), z, a)

    @torch.no_grad()
    def polyak_update(self, tau: float) -> None:
        """flow_bar ← flow_bar + τ (flow − flow_bar)."""
        if self.flow_net is None:
            return
        for pb, pf in zip(self.flow_bar.parameters(), self.flow_net.parameters()):
            pb.lerp_(pf, tau)


@dataclass
class FlowQueries:
    """Q points where ∇log F̃ is needed. x (Q, …) at schedule state `state` (Q,) of trajectory
    `traj` (Q,); `row` (Q,) the kept-transition row of a forward-point query, −1 for a trajectory
    state; x0 (Q, …) the point the reward is taken at (x̂₀(x), or x itself at state N)."""

    x: torch.Tensor
    state: torch.Tensor
    traj: torch.Tensor
    row: torch.Tensor
    x0: torch.Tensor

    def __len__(self) -> int:
        return int(self.state.shape[0])


# ---------------------------------------------------------------------------------- sampling side
def needed_states(keep: torch.Tensor, num_steps: int, cfg: TrainConfig) -> torch.Tensor:
    """(B, N+1) bool: the trajectory states whose flow value the update reads.

    Always the terminal state. With a guess: each kept x and x_next; with the λ-return Stein
    target, every state from the earliest kept step on (the bootstrapped flow at every state).
    """
    ob = cfg.objective
    B, N = keep.shape[0], num_steps
    need = torch.zeros(B, N + 1, dtype=torch.bool)
    need[:, N] = True
    if ob.guess_x0_source == "none" or cfg.method != NABLA_DB:  # the baselines read no flow
        return need
    if ob.backward_estimator == "stein_lambda" and not ob.no_flow:
        need[:, int(keep.min()):] = True
        return need
    rows = torch.arange(B)[:, None]
    need[rows, keep.cpu()] = True
    need[rows, keep.cpu() + 1] = True
    return need


def baseline_path(keep: torch.Tensor, num_steps: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N+1) states and (B, N) behaviour-ε steps a baseline update (learner/baselines_step.py)
    reads besides the kept transitions and the final state; all False for residual ∇-DB.

    draft     the last K = min(draft.k, N) steps: their states and ε (the noises are recovered from them)
    refl      every stop state the update may draw, ⌊f·N⌋ … N−1
    draft-lv, ddpo, residual-db   nothing more (the final state / the kept transitions)
    """
    B, N = keep.shape[0], num_steps
    states = torch.zeros(B, N + 1, dtype=torch.bool)
    eps = torch.zeros(B, N, dtype=torch.bool)
    if cfg.method == "draft":
        k = min(cfg.draft.k, N)
        states[:, N - k:] = True
        eps[:, N - k:] = True
    elif cfg.method == "refl":
        states[:, first_stop_step(N, cfg.refl.min_step_fraction):N] = True
    return states, eps


@torch.no_grad()
def _predict_x0(models: PolicyCallables, source: str, x: torch.Tensor, state: torch.Tensor,
                cond: torch.Tensor, chunk: int) -> torch.Tensor:
    out = []
    for sl in chunks(x.shape[0], chunk):
        out.append(models.x0_fn(source, cond[sl], state[sl])(x[sl]))
    return torch.cat(out) if out else x.new_zeros((0,) + x.shape[1:])


@torch.no_grad()
def plan_flow_queries(models: PolicyCallables, traj: Trajectories, keep: torch.Tensor, cond: torch.Tensor,
                      cfg: TrainConfig) -> tuple[FlowQueries, Optional[torch.Tensor]]:
    """The flow queries of one batch and, for forward_point=pretrained_mean, μ#(x) per kept row.

    x̂₀ at a state s < N comes from `objective.guess_x0_source` (the policy's from the sampler's
    records when it has them); at s = N it is the point itself.
    """
    ob = cfg.objective
    N, B, K = traj.num_steps, traj.batch_size, keep.shape[1]
    chunk = cfg.chunk_trajectories * max(1, K)
    device = traj.states.device
    need = needed_states(keep, N, cfg).to(device)
    b_idx, s_idx = need.nonzero(as_tuple=True)
    x = traj.states[b_idx, s_idx]
    x0 = x.clone()
    inner = s_idx < N
    if ob.guess_x0_source != "none" and bool(inner.any()):
        if ob.guess_x0_source == "policy" and traj.keep_idx is None:
            x0[inner] = traj.x0[b_idx[inner], s_idx[inner]]
        else:
            x0[inner] = _predict_x0(models, ob.guess_x0_source, x[inner], s_idx[inner], cond[b_idx[inner]], chunk)
    q = FlowQueries(x=x, state=s_idx, traj=b_idx, row=torch.full_like(s_idx, -1), x0=x0)

    fwd_point = None
    if ob.forward_point == "pretrained_mean" and cfg.method == NABLA_DB:
        rows = torch.arange(B, device=device)[:, None].expand(B, K).reshape(-1)
        idx = keep.to(device).reshape(-1)
        xk = traj.states[rows, idx]
        step_fn = get_transition(cfg.sampler.kind)
        means = []
        for sl in chunks(xk.shape[0], chunk):
            eps = models.eps(cond[rows[sl]], adapter=False)(xk[sl], idx[sl])
            means.append(step_fn(xk[sl], eps, models.alpha_bar[idx[sl]], models.alpha_bar[idx[sl] + 1],
                                 cfg.sampler.eta).mean)
        fwd_point = torch.cat(means)
        s_next = idx + 1
        use = (s_next == N) | (ob.guess_x0_source != "none")
        r_sel = use.nonzero(as_tuple=True)[0]
        fx, fs = fwd_point[r_sel], s_next[r_sel]
        fx0 = fx.clone()
        inner = fs < N
        if bool(inner.any()):
            fx0[inner] = _predict_x0(models, ob.guess_x0_source, fx[inner], fs[inner],
                                     cond[rows[r_sel][inner]], chunk)
        q = FlowQueries(x=torch.cat([q.x, fx]), state=torch.cat([q.state, fs]),
                        traj=torch.cat([q.traj, rows[r_sel]]), row=torch.cat([q.row, r_sel]),
                        x0=torch.cat([q.x0, fx0]))
    return q, fwd_point
