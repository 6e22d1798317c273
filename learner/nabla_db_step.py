"""The components of one residual ∇-DB update on a diffusion policy (no loop: see local_trainer.py).

The loss itself is `objectives.nabla_db` (pure tensors, shared with the GMM benchmark); this module
binds it to real diffusers modules and assembles its inputs, in the three phases ALGORITHM.md §3
assigns to the three kinds of process, so that the distributed mode can call the same functions:

- sampling (sampler actor): `common.trajectories.sample_trajectories`, then `plan_flow_queries`
  (common/policy.py, re-exported here, with `PolicyCallables`, which `PolicyModels` extends) —
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

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.models.lora import lora_parameters
from nablagfn.common.policy import (FlowQueries, PolicyCallables, RowCond as _RowCond,  # noqa: F401
                                    chunks as _chunks, plan_flow_queries)  # plan_flow_queries: re-exported
from nablagfn.common.samplers import get_transition
from nablagfn.common.trajectories import Trajectories

from .objectives.flow_param import flow_guess, flow_value
from .objectives.flow_param import gamma_t
from .objectives.nabla_db import (Nets, TransitionBatch, log_flow_targets, log_ratio, nabla_db_loss,
                                  stein_lambda_targets)

LOSS_TERMS = ("forward", "backward", "terminal", "value", "regulariser", "loss")


class PolicyModels(PolicyCallables):
    """The policy callables of common/policy.py plus `nets`, the bundle the objective takes."""

    def nets(self, cond: torch.Tensor, is_last: Optional[torch.Tensor] = None) -> Nets:
        rc = _RowCond(cond, is_last)
        return Nets(policy_eps=self.eps(rc, True), pretrained_eps=self.eps(rc, False),
                    flow=self.flow(rc), target_flow=self.flow(rc, target=True),
                    potential=self.potential(rc) if self.potential_flow and self.flow_net is not None else None)


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
        models.potential_flow = ob.flow_potential

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

    def value_table(self, data: UpdateData) -> torch.Tensor:
        """(B, N+1) values of the guess at the queried trajectory states, β γ_s log R(x̂₀(x_s)), and
        β log R(x_N) at state N (zero where not queried or without a guess)."""
        ob, q, s = self.cfg.objective, data.queries, data.scored
        traj = data.traj
        N = traj.num_steps
        table = torch.zeros(traj.batch_size, N + 1, dtype=traj.states.dtype, device=traj.states.device)
        st = q.row < 0
        state = q.state[st]
        weight = torch.where(state == N, torch.ones_like(self.models.alpha_bar[state]),
                             gamma_t(self.models.alpha_bar[state], ob.gamma))
        if ob.guess_x0_source == "none":
            weight = torch.where(state == N, weight, torch.zeros_like(weight))
        table[q.traj[st], state] = (ob.reward_scale * weight * s.log_r[st].to(weight)).to(table.dtype)
        return table

    @torch.no_grad()
    def value_targets(self, data: UpdateData, vtab: torch.Tensor, first: int) -> torch.Tensor:
        """λ-return targets V (B, N − first) for log F̃ at states first … N−1 (nabla_db.log_flow_targets):
        ℓ_s from the behaviour ε and the pretrained ε at every state from `first` on."""
        ob, sc, m = self.cfg.objective, self.cfg.sampler, self.models
        traj = data.traj
        if traj.keep_idx is not None:
            raise ValueError("objective.value_loss_scale > 0 needs the behaviour ε at every step "
                             "(trajectories sampled without keep_idx)")
        N, step_fn = traj.num_steps, get_transition(sc.kind)
        out = []
        for sl in _chunks(traj.batch_size, self.cfg.chunk_trajectories):
            cond = data.cond[sl]
            eps_pre, phi_bar = m.eps(cond, adapter=False), m.potential(cond, target=True)
            n = cond.shape[0]
            ell = torch.zeros(n, N - first, dtype=traj.states.dtype, device=traj.states.device)
            boot = torch.zeros(n, N - first + 1, dtype=ell.dtype, device=ell.device)
            for i in range(first, N):
                idx = torch.full((n,), i, dtype=torch.long, device=ell.device)
                x = traj.states[sl, i]
                a_t, a_n = m.alpha_bar[idx], m.alpha_bar[idx + 1]
                pol = step_fn(x, traj.eps[sl, i], a_t, a_n, sc.eta)
                pre = step_fn(x, eps_pre(x, idx), a_t, a_n, sc.eta)
                ell[:, i - first] = log_ratio(traj.states[sl, i + 1], pol.mean, pre.mean, pre.std,
                                              ob.pretrained_strength)
                if ob.value_lambda < 1:
                    boot[:, i - first] = vtab[sl, i] + phi_bar(x, idx)
            out.append(log_flow_targets(ell, vtab[sl, N], boot, ob.value_lambda))
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
        if ob.value_loss_scale > 0 and not ob.no_flow:
            first = int(keep.min())
            vtab = self.value_table(data)
            extra = {"log_flow_target": self.value_targets(data, vtab, first)[rows, idx - first],
                     "guess_value": vtab[rows, idx]}
        if fwd is not None:
            extra |= {"fwd_point": data.fwd_point, "fwd_guess": fwd, "fwd_terminal_flow": fwd}
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
