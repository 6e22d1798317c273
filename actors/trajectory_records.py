"""One sampled batch → one `TrajectoryRecord` per trajectory (schema 2, common/transport/records.py).

What a record carries is exactly what the learner reads (learner/record_batch.py rebuilds the
batch from it), decided here at sampling time so nothing unused crosses the wire:

- the kept transitions: step_idx (K,), x_t, x_next, ε_behaviour (K, *S), and the final latent;
- the other trajectory states the update reads (`common.policy.needed_states`: with the λ-return
  Stein target every state from the earliest kept step on), as states (M, *S) + state_idx (M,),
  leaving out those already carried as x_t, x_next or final;
- the flow queries of this trajectory (`plan_flow_queries`): query_state, query_row (−1 for a
  trajectory state, else the kept row k of a forward point), query_x0 — minus the terminal state,
  whose x̂₀ is `final` itself and whose reward the worker always computes;
- fwd_point (K, *S), μ#(x_t) per kept row, when objective.forward_point = pretrained_mean;
- the behaviour ε at the other steps the value term reads (`needed_eps`: every step from the
  earliest kept one on, when objective.value_loss_scale > 0), as eps_path (E, *S) + eps_idx (E,);
- for a baseline (method ≠ residual-nabla-db), the states and ε its update reads
  (`common.policy.baseline_path`: DRaFT's last K steps, ReFL's stop states) and no flow queries;
- cond_emb (L, D), the prompt's text embedding, and the sampler's timesteps (N,).
Latents and embeddings are cast to `latent_dtype`; indices are int64.
"""
from __future__ import annotations

import uuid
from typing import Optional, Sequence

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.policy import NABLA_DB, FlowQueries, baseline_path, needed_states
from nablagfn.common.trajectories import Trajectories
from nablagfn.common.transport import TrajectoryRecord


def new_traj_id(actor: str) -> str:
    """Unique across actors and restarts (a restarted actor must not reuse an id: the learner
    deduplicates by it)."""
    return f"{actor}-{uuid.uuid4().hex}"


def needed_eps(keep: torch.Tensor, num_steps: int, cfg: TrainConfig) -> Optional[torch.Tensor]:
    """(B, N) bool: the steps whose behaviour ε the learner reads besides the kept ones — every
    step from the earliest kept one on when the value term is on (its log-ratio ℓ_s needs the
    behaviour mean at each step) — or None."""
    if cfg.method != NABLA_DB:  # a baseline: the steps `baseline_path` names (DRaFT's last K)
        eps = baseline_path(keep, num_steps, cfg)[1]
        return eps if bool(eps.any()) else None
    ob = cfg.objective
    if getattr(ob, "value_loss_scale", 0.0) <= 0 or ob.no_flow:
        return None
    out = torch.zeros(keep.shape[0], num_steps, dtype=torch.bool)
    out[:, int(keep.min()):] = True
    return out


def record_steps(keep: torch.Tensor, num_steps: int, cfg: TrainConfig) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the records of a batch carry besides the kept transitions: the states (B, N+1) —
    `needed_states` plus a baseline's `baseline_path` — and the ε steps (B, N) or None (`needed_eps`)."""
    keep = keep.cpu()
    return needed_states(keep, num_steps, cfg) | baseline_path(keep, num_steps, cfg)[0], needed_eps(keep, num_steps, cfg)


def trajectory_records(traj: Trajectories, keep: torch.Tensor, cond: torch.Tensor,
                       prompt_ids: Sequence[int], prompts: Sequence[str], queries: FlowQueries,
                       fwd_point: Optional[torch.Tensor], needed: torch.Tensor, *,
                       timesteps: torch.Tensor, meta: dict, actor: str,
                       latent_dtype: torch.dtype = torch.float32,
                       eps_steps: Optional[torch.Tensor] = None) -> list[TrajectoryRecord]:
    """Records of the B trajectories of one batch.

    traj: states (B, N+1, *S) and ε (B, N, *S) at every step (sampled without keep_idx);
    keep (B, K); cond (B, L, D); queries / fwd_point as `plan_flow_queries` returns them (rows of
    fwd_point trajectory-major, B·K); needed (B, N+1) bool, `needed_states`; eps_steps (B, N) bool or
    None, `needed_eps` (also the states there are carried). `meta` holds the fields
    shared by the batch (run_id, policy_version, sampler, num_steps, ...); traj_id, prompt_id and
    prompt are added per record.
    """
    if traj.keep_idx is not None:
        raise ValueError("trajectory_records needs ε at every step (sample without keep_idx)")
    B, N, K = traj.batch_size, traj.num_steps, int(keep.shape[1])
    cpu = torch.device("cpu")
    states = traj.states.detach().to(cpu)
    eps = traj.eps.detach().to(cpu)
    keep = keep.detach().to(cpu).long()
    q_traj, q_state, q_row = (t.detach().to(cpu).long() for t in (queries.traj, queries.state, queries.row))
    q_x0 = queries.x0.detach().to(cpu)
    needed = needed.detach().to(cpu)
    fwd = None if fwd_point is None else fwd_point.detach().to(cpu)
    ts = timesteps.detach().to(cpu).long()

    def lat(t: torch.Tensor) -> torch.Tensor:
        return t.to(latent_dtype).contiguous()

    out = []
    for b in range(B):
        k = keep[b]
        carried = set(k.tolist()) | set((k + 1).tolist()) | {N}
        need_b = needed[b].clone()
        if eps_steps is not None:
            need_b[:N] |= eps_steps[b].to(need_b.device)
        extra = [s for s in need_b.nonzero(as_tuple=True)[0].tolist() if s not in carried]
        sel = (q_traj == b) & ~((q_row < 0) & (q_state == N))
        rows = q_row[sel]
        tensors = {
            "timesteps": ts.clone(), "step_idx": k.clone(),
            "x_t": lat(states[b, k]), "x_next": lat(states[b, k + 1]), "eps_behaviour": lat(eps[b, k]),
            "final": lat(states[b, N]), "cond_emb": lat(cond[b].detach().to(cpu)),
        }
        if bool(sel.any()):  # a record without flow queries (a baseline's) carries none of these
            tensors.update(query_state=q_state[sel].clone(), query_row=torch.where(rows >= 0, rows - b * K, rows),
                           query_x0=lat(q_x0[sel]))
        if extra:
            idx = torch.tensor(extra, dtype=torch.long)
            tensors["states"] = lat(states[b, idx])
            tensors["state_idx"] = idx
        if fwd is not None:
            tensors["fwd_point"] = lat(fwd[b * K:(b + 1) * K])
        if eps_steps is not None:
            kept = set(k.tolist())
            e_idx = [i for i in eps_steps[b].nonzero(as_tuple=True)[0].tolist() if i not in kept]
            if e_idx:
                idx = torch.tensor(e_idx, dtype=torch.long)
                tensors["eps_idx"] = idx
                tensors["eps_path"] = lat(eps[b, idx])
        rec_meta = {**meta, "traj_id": new_traj_id(actor), "prompt_id": int(prompt_ids[b]),
                    "prompt": str(prompts[b]), "actor": actor}
        out.append(TrajectoryRecord(meta=rec_meta, tensors=tensors))
    return out
