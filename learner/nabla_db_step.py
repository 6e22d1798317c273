"""The components of one residual ∇-DB update on a diffusion policy (no loop: see local_trainer.py).

The loss itself is `objectives.nabla_db` (pure tensors, shared with the GMM benchmark); this module
binds it to real diffusers modules and assembles its inputs, in the three phases ALGORITHM.md §3
assigns to the three kinds of process, so that the distributed mode can call the same functions:

- sampling (sampler actor): `common.trajectories.sample_trajectories`, then `plan_flow_queries` —
  the points where a flow value is needed (trajectory states, and the pretrained means μ#(x) for
  `forward_point=pretrained_mean`) and the x̂₀ the reward is taken at (no grad; the pretrained
  model's x̂₀ is one batched UNet call with the adapter disabled, the policy's comes with ε).
- reward (reward service): `score_flow_queries` — log R and ∇_{x̂₀} log R through the VAE in float32.
- learner: `NablaDBLearner.learn` — the chain rule from x̂₀ to x (a VJP through the x̂₀ map, or its
  diagonal 1/√ᾱ), the λ-return Stein targets, the `TransitionBatch`, the loss, AdamW over the LoRA
  and g_φ with gradient clipping, and the Polyak update of the target copy of g_φ.

A flow query at a state s < N gets the guess β γ_s ∇_x log R(x̂₀(x)); at s = N (the terminal latent,
or μ# of a last transition) x̂₀ is x itself and the value is the exact terminal flow β ∇ log R(x).
Trajectories any of whose rewards or reward gradients is not finite are dropped whole and counted
(`drop_invalid`): they never reach the optimizer.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.models.lora import lora_parameters
from nablagfn.common.prediction import x0_from_eps
from nablagfn.common.samplers import get_transition
from nablagfn.common.schedule import SamplingSchedule
from nablagfn.common.trajectories import Trajectories

from .objectives.flow_param import flow_guess, flow_value
from .objectives.nabla_db import Nets, TransitionBatch, nabla_db_loss, stein_lambda_targets

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_TERMS = ("forward", "backward", "terminal", "regulariser", "loss")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _RowCond:
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


class PolicyModels:
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

    def eps(self, cond: torch.Tensor | _RowCond, adapter: bool) -> EpsFn:
        rc = cond if isinstance(cond, _RowCond) else _RowCond(cond)

        def fn(x, idx):
            return self.denoiser.eps(x, self.state_t[idx], rc(x.shape[0]), self.uncond,
                                     self.guidance_scale, adapter=adapter)
        return fn

    def flow(self, cond: torch.Tensor | _RowCond, target: bool = False) -> EpsFn:
        rc = cond if isinstance(cond, _RowCond) else _RowCond(cond)
        net = self.flow_bar if target else self.flow_net
        if net is None:
            return lambda x, idx: torch.zeros_like(x)
        return lambda x, idx: net(x, self.state_t[idx], rc(x.shape[0]))

    def nets(self, cond: torch.Tensor, is_last: Optional[torch.Tensor] = None) -> Nets:
        rc = _RowCond(cond, is_last)
        return Nets(policy_eps=self.eps(rc, True), pretrained_eps=self.eps(rc, False),
                    flow=self.flow(rc), target_flow=self.flow(rc, target=True))

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


@dataclass
class ScoredQueries:
    """The reward service's answer for each query: log R (Q,), ∇_{x0} log R (Q, …), finite (Q,)."""

    log_r: torch.Tensor
    grad: torch.Tensor
    valid: torch.Tensor


@dataclass
class UpdateData:
    """One update's sampled and scored data, B trajectories with K kept transitions each."""

    traj: Trajectories
    keep: torch.Tensor  # (B, K) kept step indices
    cond: torch.Tensor  # (B, L, D) text embeddings
    prompts: list[str]
    queries: FlowQueries
    scored: ScoredQueries
    fwd_point: Optional[torch.Tensor] = None  # (B·K, …) μ#(x) per kept row (forward_point=pretrained_mean)

    @property
    def terminal_log_r(self) -> torch.Tensor:
        """log R(x_N) per trajectory (B,)."""
        N = self.traj.num_steps
        sel = (self.queries.state == N) & (self.queries.row < 0)
        out = torch.full((self.traj.batch_size,), float("nan"), dtype=self.scored.log_r.dtype,
                         device=self.scored.log_r.device)
        out[self.queries.traj[sel]] = self.scored.log_r[sel]
        return out


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
    if ob.guess_x0_source == "none":
        return need
    if ob.backward_estimator == "stein_lambda" and not ob.no_flow:
        need[:, int(keep.min()):] = True
        return need
    rows = torch.arange(B)[:, None]
    need[rows, keep.cpu()] = True
    need[rows, keep.cpu() + 1] = True
    return need


@torch.no_grad()
def _predict_x0(models: PolicyModels, source: str, x: torch.Tensor, state: torch.Tensor,
                cond: torch.Tensor, chunk: int) -> torch.Tensor:
    out = []
    for sl in _chunks(x.shape[0], chunk):
        out.append(models.x0_fn(source, cond[sl], state[sl])(x[sl]))
    return torch.cat(out) if out else x.new_zeros((0,) + x.shape[1:])


@torch.no_grad()
def plan_flow_queries(models: PolicyModels, traj: Trajectories, keep: torch.Tensor, cond: torch.Tensor,
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
    if ob.forward_point == "pretrained_mean":
        rows = torch.arange(B, device=device)[:, None].expand(B, K).reshape(-1)
        idx = keep.to(device).reshape(-1)
        xk = traj.states[rows, idx]
        step_fn = get_transition(cfg.sampler.kind)
        means = []
        for sl in _chunks(xk.shape[0], chunk):
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


# ------------------------------------------------------------------------------------ reward side
def score_flow_queries(queries: FlowQueries, vae, reward, prompts: Sequence[str], chunk: int) -> ScoredQueries:
    """log R and ∇_{x0} log R at every query's x0 through the VAE decoder (float32)."""
    from nablagfn.rewards_service.rewards import log_reward_and_grad

    per_query = [prompts[int(b)] for b in queries.traj.tolist()]
    res = log_reward_and_grad(queries.x0, vae, reward, per_query, chunk=chunk)
    dev = queries.x0.device
    return ScoredQueries(log_r=res.log_r.to(dev, torch.float32), grad=res.grad.to(dev, torch.float32),
                         valid=res.valid.to(dev))


def drop_invalid(data: UpdateData) -> tuple[UpdateData, torch.Tensor]:
    """Keep the trajectories all of whose queries are finite; returns (kept data, valid (B,) bool)."""
    B = data.traj.batch_size
    q, s = data.queries, data.scored
    n_bad = torch.zeros(B, dtype=torch.long, device=q.traj.device).index_add_(0, q.traj, (~s.valid).long())
    valid = n_bad == 0
    if bool(valid.all()):
        return data, valid
    new_id = torch.cumsum(valid.long(), 0) - 1
    K = data.keep.shape[1]
    q_keep = valid[q.traj]
    row_map = torch.full((B * K,), -1, dtype=torch.long, device=q.traj.device)
    kept_rows = valid.repeat_interleave(K)
    row_map[kept_rows] = torch.arange(int(kept_rows.sum()), device=q.traj.device)
    rows = q.row[q_keep]
    traj = data.traj
    vi = valid.to(traj.states.device)
    new = UpdateData(
        traj=Trajectories(states=traj.states[vi], eps=traj.eps[vi], x0=traj.x0[vi],
                          keep_idx=None if traj.keep_idx is None else traj.keep_idx[vi]),
        keep=data.keep[valid.to(data.keep.device)], cond=data.cond[vi],
        prompts=[p for p, v in zip(data.prompts, valid.tolist()) if v],
        queries=FlowQueries(x=q.x[q_keep], state=q.state[q_keep], traj=new_id[q.traj[q_keep]],
                            row=torch.where(rows >= 0, row_map[rows.clamp_min(0)], rows), x0=q.x0[q_keep]),
        scored=ScoredQueries(log_r=s.log_r[q_keep], grad=s.grad[q_keep], valid=s.valid[q_keep]),
        fwd_point=None if data.fwd_point is None else data.fwd_point[kept_rows.to(data.fwd_point.device)])
    return new, valid


# ------------------------------------------------------------------------------------------ learner
def _take(batch: TransitionBatch, rows: torch.Tensor) -> TransitionBatch:
    return TransitionBatch(**{f.name: (None if getattr(batch, f.name) is None else getattr(batch, f.name)[rows])
                              for f in dataclasses.fields(batch)})


class NablaDBLearner:
    """g_φ, its Polyak copy, the LoRA policy's optimizer; `learn(data)` runs one update's steps."""

    def __init__(self, cfg: TrainConfig, models: PolicyModels):
        self.cfg, self.models = cfg, models
        o, ob = cfg.optim, cfg.objective
        self.lora_params = lora_parameters(models.denoiser.unet)
        if not self.lora_params:
            raise ValueError("the policy UNet has no LoRA parameters: call add_lora first")
        groups = [{"params": self.lora_params, "lr": o.lr, "weight_decay": o.weight_decay}]
        self.flow_params = [] if (models.flow_net is None or ob.no_flow) else list(models.flow_net.parameters())
        if self.flow_params:
            groups.append({"params": self.flow_params, "lr": o.flow_lr, "weight_decay": o.flow_weight_decay})
        self.opt = torch.optim.AdamW(groups, betas=tuple(o.betas))
        self.steps = 0

    # -- flow values -------------------------------------------------------------------------------
    def query_flows(self, data: UpdateData) -> torch.Tensor:
        """∇log F̃ at each query (Q, …): β∇log R(x) at state N, else β γ_s ∇_x log R(x̂₀(x)) (detached)."""
        ob, m = self.cfg.objective, self.models
        q, s = data.queries, data.scored
        N, K = data.traj.num_steps, data.keep.shape[1]
        out = torch.zeros_like(q.x)
        term = q.state == N
        out[term] = ob.reward_scale * s.grad[term]
        inner = (~term).nonzero(as_tuple=True)[0]
        if ob.guess_x0_source == "none" or inner.numel() == 0:
            return out
        chunk = self.cfg.chunk_trajectories * max(1, K)
        for sl in _chunks(inner.numel(), chunk):
            r = inner[sl]
            st = q.state[r]
            x0_fn = m.x0_fn(ob.guess_x0_source, data.cond[q.traj[r]], st)
            out[r] = flow_guess(q.x[r], s.grad[r], m.alpha_bar[st], ob.reward_scale, ob.gamma, x0_fn, ob.x0_grad)
        return out

    def flow_tables(self, data: UpdateData, flows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, N+1, …) guess table over trajectory states (zero where not queried; the terminal flow
        at state N), and the (B·K, …) flow at the forward points (or None)."""
        q, traj = data.queries, data.traj
        B, N, K = traj.batch_size, traj.num_steps, data.keep.shape[1]
        table = torch.zeros_like(traj.states)
        st = q.row < 0
        table[q.traj[st], q.state[st]] = flows[st]
        fwd = None
        if data.fwd_point is not None:
            fwd = torch.zeros_like(data.fwd_point)
            fr = ~st
            fwd[q.row[fr]] = flows[fr]
        return table, fwd

    def stein_targets(self, data: UpdateData, table: torch.Tensor, first: int) -> torch.Tensor:
        """λ-return Stein targets (B, N − first, …) for states first … N−1, chunked by trajectory."""
        ob, sc, m = self.cfg.objective, self.cfg.sampler, self.models
        traj = data.traj
        out = []
        for sl in _chunks(traj.batch_size, self.cfg.chunk_trajectories):
            cond, tab = data.cond[sl], table[sl]
            flow_bar = m.flow(cond, target=True)

            def target_flow_value(x, idx, tab=tab, flow_bar=flow_bar):
                i = int(idx[0])
                return flow_value(flow_bar(x, idx), tab[:, i], m.alpha_bar[idx], ob.flow_output)

            out.append(stein_lambda_targets(traj.states[sl], m.alpha_bar, m.eps(cond, adapter=False),
                                            target_flow_value, tab[:, -1], ob.stein_lambda, sc.kind, sc.eta,
                                            first_step=first))
        return torch.cat(out)

    def transition_batch(self, data: UpdateData) -> TransitionBatch:
        """All B·K kept transitions (rows ordered trajectory-major) with guesses and targets."""
        ob, m = self.cfg.objective, self.models
        traj, keep = data.traj, data.keep.to(data.traj.states.device)
        B, N, K = traj.batch_size, traj.num_steps, keep.shape[1]
        table, fwd = self.flow_tables(data, self.query_flows(data))
        rows = torch.arange(B, device=keep.device)[:, None].expand(B, K).reshape(-1)
        idx = keep.reshape(-1)
        if traj.keep_idx is None:
            eps_beh = traj.eps[rows, idx]
        else:
            if not torch.equal(traj.keep_idx.to(keep.device), keep):
                raise ValueError("the trajectories recorded ε at other steps than the kept ones")
            eps_beh = traj.eps.reshape((B * K,) + traj.eps.shape[2:])
        stein_target = None
        if ob.backward_estimator == "stein_lambda" and not ob.no_flow:
            first = int(keep.min())
            stein_target = self.stein_targets(data, table, first)[rows, idx - first]
        extra = {}
        if fwd is not None:
            extra = {"fwd_point": data.fwd_point, "fwd_guess": fwd, "fwd_terminal_flow": fwd}
        return TransitionBatch(
            x=traj.states[rows, idx], x_next=traj.states[rows, idx + 1], step_idx=idx,
            alpha_bar_t=m.alpha_bar[idx], alpha_bar_next=m.alpha_bar[idx + 1], is_last=idx == N - 1,
            eps_behaviour=eps_beh, guess=table[rows, idx], guess_next=table[rows, idx + 1],
            terminal_flow=table[rows, N], stein_target=stein_target, **extra)

    # -- optimisation ------------------------------------------------------------------------------
    def _grad_norm(self, params: list, clip: float) -> float:
        if not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))

    def optimizer_step(self, batch: TransitionBatch, cond_rows: torch.Tensor, traj_of_row: torch.Tensor) -> dict:
        """One AdamW step on `batch`: the loss accumulated over chunks of whole trajectories (each
        chunk weighted by its share of rows, so the gradient is that of the full-batch mean), gradient
        clipping per parameter group, then the Polyak update of the target g_φ."""
        cfg, ob = self.cfg, self.cfg.objective
        self.opt.zero_grad(set_to_none=True)
        trajs = torch.unique(traj_of_row)
        totals = {k: 0.0 for k in LOSS_TERMS}
        R = batch.step_idx.shape[0]
        for sl in _chunks(trajs.numel(), cfg.chunk_trajectories):
            rows = torch.isin(traj_of_row, trajs[sl]).nonzero(as_tuple=True)[0]
            part = _take(batch, rows)
            nets = self.models.nets(cond_rows[rows], part.is_last)
            terms = nabla_db_loss(part, nets, ob, cfg.sampler.kind, cfg.sampler.eta)
            w = rows.numel() / R
            (terms["loss"] * w).backward()
            for k in LOSS_TERMS:
                totals[k] += w * float(terms[k].detach())
        norms = {"grad_norm_lora": self._grad_norm(self.lora_params, cfg.optim.grad_clip),
                 "grad_norm_flow": self._grad_norm(self.flow_params, cfg.optim.grad_clip)}
        self.opt.step()
        self.models.polyak_update(ob.target_flow_tau)
        self.steps += 1
        return {**totals, **norms}

    def learn(self, data: UpdateData) -> dict:
        """All optimizer steps of one update (train_batch_trajectories per step); mean metrics."""
        cfg = self.cfg
        B, K = data.traj.batch_size, data.keep.shape[1]
        if B == 0:
            return {k: float("nan") for k in LOSS_TERMS + ("grad_norm_lora", "grad_norm_flow")} | {"optimizer_steps": 0}
        batch = self.transition_batch(data)
        traj_of_row = torch.arange(B, device=batch.x.device).repeat_interleave(K)
        cond_rows = data.cond[traj_of_row]
        per_step = cfg.train_batch_trajectories or B
        logs = []
        for sl in _chunks(B, per_step):
            rows = torch.arange(sl.start * K, sl.stop * K, device=batch.x.device)
            logs.append(self.optimizer_step(_take(batch, rows), cond_rows[rows], traj_of_row[rows]))
        out = {k: sum(lg[k] for lg in logs) / len(logs) for k in logs[0]}
        out["optimizer_steps"] = len(logs)
        return out

    # -- state ---------------------------------------------------------------------------------------
    def flow_state_dict(self) -> dict[str, torch.Tensor]:
        net = self.models.flow_net
        return {} if net is None else {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
