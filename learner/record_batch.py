"""Scored records → the `UpdateData` that `NablaDBLearner.learn` takes (the inverse of
actors/trajectory_records.py, through the reward worker).

Per trajectory b the state table (N+1, *S) is filled from what the record carries — states at
state_idx, x_t at step_idx, x_next at step_idx + 1, final at N — and every state the learner's
objective reads (`needed_states`) must be among them. Flow queries are rebuilt in the order
`plan_flow_queries` produces them (trajectory-state queries trajectory-major by state, the terminal
one from `final` with log_reward / grad_final, then the forward-point queries by row), so an update
on rebuilt data is the update the one-process trainer makes on the same samples. query x0 is set to
the query point x: the learner recomputes x̂₀(x) for the chain rule and never reads it.

With the value term on, records carry the behaviour ε along the path (eps_path): the batch then
holds a (B, N, *S) ε table (keep_idx None), zero where a record carries none.

`check_record` is the per-record gate the learner applies before batching (run id, sampler, steps,
schedule, kept count, the states and queries the objective needs); it raises RecordError with the
field, so the learner can dead-letter the record and go on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.policy import NABLA_DB, FlowQueries, baseline_path, needed_states
from nablagfn.common.subsample import num_kept
from nablagfn.common.trajectories import Trajectories
from nablagfn.common.transport import RecordError, ScoredRecord
from nablagfn.common.transport.records import carried_eps, carried_states, check_model_shapes

from .nabla_db_step import ScoredQueries, UpdateData


def check_record(rec: ScoredRecord, cfg: TrainConfig, timesteps: torch.Tensor, run_id: str,
                 shapes: Optional[tuple[tuple[int, ...], tuple[int, int]]] = None) -> None:
    """Raise RecordError unless `rec` (already schema-valid) fits this learner's run and objective
    (and, given `shapes` = (latent, text embedding), its model: `check_model_shapes`)."""
    m, t = rec.meta, rec.tensors
    if shapes is not None:
        check_model_shapes(rec, *shapes)
    N, sc = cfg.sampler.num_steps, cfg.sampler
    if m["run_id"] != run_id:
        raise RecordError(f"meta.run_id: {m['run_id']!r}, expected {run_id!r}")
    if m["sampler"] != sc.kind:
        raise RecordError(f"meta.sampler: {m['sampler']!r}, expected {sc.kind!r}")
    if m["num_steps"] != N:
        raise RecordError(f"meta.num_steps: {m['num_steps']}, expected {N}")
    if not torch.equal(t["timesteps"].long().cpu(), timesteps.long().cpu()):
        raise RecordError("tensors.timesteps: the sampler's schedule differs from the learner's")
    K = num_kept(N, cfg.subsample.timestep_fraction, cfg.subsample.keep_last)
    if rec.num_kept != K:
        raise RecordError(f"tensors.step_idx: {rec.num_kept} kept transitions, expected {K}")
    if "cond_emb" not in t:
        raise RecordError("tensors.cond_emb: missing (the learner conditions the policy on it)")
    keep = t["step_idx"].long().cpu()[None]
    need = set(needed_states(keep, N, cfg)[0].nonzero(as_tuple=True)[0].tolist())
    have = carried_states(t, N)
    if not need <= have:
        raise RecordError(f"tensors.states: states {sorted(need - have)[:8]} are needed by the objective "
                          "but not carried")
    queried = set() if "query_state" not in t else {
        s for s, r in zip(t["query_state"].tolist(), t["query_row"].tolist()) if r < 0}
    missing = sorted(need - queried - {N})
    if missing:
        raise RecordError(f"tensors.query_state: states {missing[:8]} need a flow query")
    ob = cfg.objective
    if cfg.method != NABLA_DB:  # a baseline: the states and ε its update reads (`baseline_path`)
        b_states, b_eps = baseline_path(keep, N, cfg)
        missing = sorted(set(b_states[0].nonzero(as_tuple=True)[0].tolist()) - have)
        if missing:
            raise RecordError(f"tensors.states: states {missing[:8]} are needed by method {cfg.method} "
                              "but not carried")
        missing = sorted(set(b_eps[0].nonzero(as_tuple=True)[0].tolist()) - carried_eps(t))
        if missing:
            raise RecordError(f"tensors.eps_path: the behaviour ε at steps {missing[:8]} is needed by "
                              f"method {cfg.method} but not carried")
    elif getattr(ob, "value_loss_scale", 0.0) > 0 and not ob.no_flow:  # ℓ_s at every step from the first kept
        first = int(keep.min())
        missing = sorted(set(range(first, N)) - carried_eps(t))
        if missing:
            raise RecordError(f"tensors.eps_path: the behaviour ε at steps {missing[:8]} is needed by the "
                              "value term (objective.value_loss_scale > 0) but not carried")
        missing = sorted(set(range(first, N + 1)) - have)
        if missing:
            raise RecordError(f"tensors.states: states {missing[:8]} are needed by the value term but not carried")
    fwd = cfg.objective.forward_point == "pretrained_mean" and cfg.method == NABLA_DB
    if fwd and "fwd_point" not in t:
        raise RecordError("tensors.fwd_point: missing (objective.forward_point=pretrained_mean)")
    if not fwd and "fwd_point" in t:
        raise RecordError("tensors.fwd_point: present, but objective.forward_point=sample")


def update_data(records: Sequence[ScoredRecord], device: torch.device | str = "cpu") -> UpdateData:
    """The UpdateData of B scored records (all with the same N, K and latent shape), float32."""
    if not records:
        raise ValueError("update_data needs at least one record")
    device = torch.device(device)
    N = int(records[0].meta["num_steps"])
    K = records[0].num_kept
    S = tuple(records[0].tensors["final"].shape)
    B = len(records)
    for r in records:
        if r.meta["num_steps"] != N or r.num_kept != K or tuple(r.tensors["final"].shape) != S:
            raise RecordError(f"record {r.traj_id}: (num_steps, K, S) = ({r.meta['num_steps']}, "
                              f"{r.num_kept}, {tuple(r.tensors['final'].shape)}), batch has ({N}, {K}, {S})")

    def f32(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=torch.float32)

    states = torch.zeros((B, N + 1) + S, device=device)
    keep = torch.stack([r.tensors["step_idx"].long() for r in records]).to(device)
    eps = torch.stack([f32(r.tensors["eps_behaviour"]) for r in records])
    keep_idx = keep
    if any("eps_idx" in r.tensors for r in records):  # the ε path: a (B, N, *S) table, 0 where not carried
        full = torch.zeros((B, N) + S, device=device)
        for b, r in enumerate(records):
            full[b, keep[b]] = eps[b]
            if "eps_idx" in r.tensors:
                full[b, r.tensors["eps_idx"].long().to(device)] = f32(r.tensors["eps_path"])
        eps, keep_idx = full, None
    cond = torch.stack([f32(r.tensors["cond_emb"]) for r in records])
    t_x, t_state, t_traj, t_row, t_logr, t_grad = [], [], [], [], [], []
    f_x, f_state, f_traj, f_row, f_logr, f_grad = [], [], [], [], [], []
    fwd_points = []
    for b, r in enumerate(records):
        t = r.tensors
        if "states" in t:
            idx = t["state_idx"].long().to(device) if "state_idx" in t else torch.arange(N + 1, device=device)
            states[b, idx] = f32(t["states"])
        states[b, keep[b]] = f32(t["x_t"])
        states[b, keep[b] + 1] = f32(t["x_next"])
        states[b, N] = f32(t["final"])
        qs = t["query_state"].long().tolist() if "query_state" in t else []
        qr = t["query_row"].long().tolist() if "query_state" in t else []
        # trajectory-state queries by state, then the terminal one (state N) from `final`
        own = sorted((s, q) for q, (s, row) in enumerate(zip(qs, qr)) if row < 0)
        for s, q in own:
            t_x.append(states[b, s])
            t_state.append(s)
            t_logr.append(f32(t["query_log_r"][q]))
            t_grad.append(f32(t["query_grad"][q]))
        t_x.append(states[b, N])
        t_state.append(N)
        t_logr.append(torch.tensor(float(r.meta["log_reward"]), device=device))
        t_grad.append(f32(t["grad_final"]))
        t_traj += [b] * (len(own) + 1)
        t_row += [-1] * (len(own) + 1)
        if "fwd_point" in t:
            fp = f32(t["fwd_point"])
            fwd_points.append(fp)
            for q, (s, row) in sorted(((q, (s, row)) for q, (s, row) in enumerate(zip(qs, qr)) if row >= 0),
                                      key=lambda e: e[1][1]):
                f_x.append(fp[row])
                f_state.append(s)
                f_traj.append(b)
                f_row.append(b * K + row)
                f_logr.append(f32(t["query_log_r"][q]))
                f_grad.append(f32(t["query_grad"][q]))
    if fwd_points and len(fwd_points) != B:
        raise RecordError("tensors.fwd_point: present in some records of the batch only")
    x = torch.stack(t_x + f_x)

    def long(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.long, device=device)

    queries = FlowQueries(x=x, state=long(t_state + f_state), traj=long(t_traj + f_traj),
                          row=long(t_row + f_row), x0=x.clone())
    log_r = torch.stack(t_logr + f_logr).float()
    scored = ScoredQueries(log_r=log_r, grad=torch.stack(t_grad + f_grad),
                           valid=torch.ones_like(log_r, dtype=torch.bool))
    traj = Trajectories(states=states, eps=eps, x0=torch.zeros_like(eps), keep_idx=keep_idx)
    return UpdateData(traj=traj, keep=keep, cond=cond, prompts=[r.meta["prompt"] for r in records],
                      queries=queries, scored=scored,
                      fwd_point=torch.cat(fwd_points) if fwd_points else None)
