"""`nablagfn bench gmm --distributed`: the exact GMM testbed run through the service.

The same problem, networks, objective and optimiser as the one-process benchmark
(bench/gmm/run.py: `GMMProblem`, `Trainer`), split the way the diffusion path is:
- sampler actors (`GMMSamplerActor` = `SamplerLoop` + `GMMSamplerPolicy`) hold a copy of the policy
  residual, load each published version from the registry, sample trajectories, choose the kept
  transitions and the flow-query states (`needed_states`), take the guess's x̂₀ there, and write one
  trajectory record each to `stream:traj`;
- a reward worker (`RewardWorker` with `GMMScorer`, the exact log R and ∇ log R) scores every
  query's x̂₀ and the final point and writes scored records;
- the learner (`StreamLearner` + `GMMLearnerModel`) admits records (lag bound, dedup, validation),
  rebuilds the batch (`record_batch.update_data`), turns ∇_{x̂₀} log R into the guess table
  (`flow_guess`, the chain rule through the guess's x̂₀ map), builds the λ-return Stein targets
  from that table, and takes the `Trainer`'s optimiser step on `nabla_db_loss`; it publishes the
  residual every `publish_every` updates.
The driver (this module) tails the learner's metrics, evaluates the latest published policy every
`eval_every` updates (TV of mode weights on `eval_samples` fresh samples) and at the end on
`final_samples`, and with `compare_local` also runs the one-process benchmark with the same
config for the bar: TV within 0.03 of it for the same update count.

Supported: the residual ∇-DB method with the guess from the pretrained or policy x̂₀ (or none),
the `sampled`/`stein`/`stein_lambda` backward estimators, the scalar-potential flow and the value
term (samplers then carry the behaviour ε path), forward_point=sample, and the policy weight
average that evaluation samples from (`policy_ema`: the learner keeps it and publishes it beside
each version under `ema:*`); the diagnostics (oracle_*) and the rectified-flow family run in the
one-process benchmark only.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from nablagfn.actors.sampler_actor import SamplerLoop
from nablagfn.actors.trajectory_records import needed_eps, trajectory_records
from nablagfn.common.config import DistributedConfig, RewardConfig, TrainConfig
from nablagfn.common.config_io import ConfigError, to_dict
from nablagfn.common.policy import FlowQueries, needed_states
from nablagfn.common.prediction import x0_from_eps
from nablagfn.common.subsample import subsample_steps
from nablagfn.common.trajectories import Trajectories
from nablagfn.common.transport import ScoredRecord, TrajectoryRecord
from nablagfn.learner.checkpoint import Checkpoint
from nablagfn.learner.learner_actor import StreamLearner
from nablagfn.rewards_service.worker import RewardWorker

from .gmm import exact
from .gmm.models import TimeMLP
from .gmm.run import GMMBenchConfig, GMMProblem, Trainer, measure
from .gmm.spec import GMMSpec

REWARD_NAME = "gmm-exact"
COMPARE_TOLERANCE = 0.03  # the bar: |TV distributed − TV one-process| for the same updates


def check_supported(cfg: GMMBenchConfig) -> None:
    ob = cfg.objective
    bad = [(cfg.method != "residual-nabla-db", "method", f"{cfg.method!r} (residual-nabla-db only)"),
           (getattr(cfg, "model_family", "ddpm") != "ddpm", "model_family", "flow (ddpm only)"),
           (cfg.oracle_flow or cfg.oracle_policy, "oracle_flow/oracle_policy", "diagnostics"),
           (ob.forward_point != "sample", "objective.forward_point", ob.forward_point)]
    for is_bad, field, what in bad:
        if is_bad:
            raise ConfigError(f"{field}: {what} runs in the one-process benchmark only, not with --distributed")


def default_distributed(cfg: GMMBenchConfig, **overrides: Any) -> DistributedConfig:
    """Two samplers each sampling half an update's batch per round, one reward worker; streams
    bounded so that what is in flight is what the learner can still admit (as the driver's
    `useful_depth`); no checkpoints (acks right after each update)."""
    d = DistributedConfig(num_samplers=2, num_reward_workers=1, sampler_batch=max(1, cfg.batch_trajectories // 2),
                          max_policy_lag=1, publish_every=1, checkpoint_every=0,  # a benchmark run does not resume
                          reward_batch=cfg.batch_trajectories, block_ms=50, poll_s=0.005)
    for k, v in overrides.items():
        setattr(d, k, v)
    # (lag + 1) · batch records in flight over the two streams: what the learner can still admit
    d.redis.max_stream_depth = -(-(d.max_policy_lag + 1) * cfg.batch_trajectories // 2)
    return d


def train_view(cfg: GMMBenchConfig, dcfg: DistributedConfig, run_dir: str = "") -> TrainConfig:
    """The TrainConfig fields the shared service code reads (sampler, subsample, objective,
    distributed, batch sizes), taken from the bench config."""
    return TrainConfig(sampler=cfg.sampler, subsample=cfg.subsample, objective=cfg.objective, optim=cfg.optim,
                       distributed=dcfg, reward=RewardConfig(name=REWARD_NAME), batch_trajectories=cfg.batch_trajectories,
                       updates=cfg.updates, seed=cfg.seed, device="cpu", threads=cfg.threads,
                       run_dir=run_dir or "runs/gmm-distributed", progress=False)


def _residual(spec: GMMSpec, cfg: GMMBenchConfig) -> TimeMLP:
    return TimeMLP(spec.dim, cfg.hidden, cfg.layers, cfg.emb_dim)


# -------------------------------------------------------------------------------------- sampler
class GMMSamplerPolicy:
    """ε# (exact) + the residual MLP; samples records (a `SamplerPolicy`)."""

    def __init__(self, spec: GMMSpec, cfg: GMMBenchConfig, tc: TrainConfig, index: int):
        torch.set_num_threads(cfg.threads)
        self.cfg, self.tc = cfg, tc
        self.problem = GMMProblem(spec, cfg.sampler)
        self.residual = _residual(spec, cfg).requires_grad_(False)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + index)

    def policy_eps(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        p = self.problem
        return p.pretrained_eps(x, idx) + self.residual(x, p.state_t[idx])

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.residual.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.residual.load_state_dict(state)

    @torch.no_grad()
    def x0(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x̂₀ of the guess's source model."""
        p = self.problem
        if self.cfg.objective.guess_x0_source == "policy":
            return x0_from_eps(self.policy_eps(x, idx), x, p.alpha_bar[idx])
        return p.pretrained_x0(x, idx)

    @torch.no_grad()
    def sample_records(self, n: int, meta: dict, actor: str) -> list[TrajectoryRecord]:
        p, sub = self.problem, self.cfg.subsample
        N = p.schedule.num_steps
        states, eps = p.sample(self.policy_eps, n, self.gen)
        keep = subsample_steps(n, N, sub.timestep_fraction, sub.low_variance, sub.keep_last, self.gen)
        need = needed_states(keep, N, self.tc)
        b, s = need.nonzero(as_tuple=True)
        x = states[b, s]
        x0 = x.clone()
        inner = s < N
        if self.cfg.objective.guess_x0_source != "none" and bool(inner.any()):
            x0[inner] = self.x0(x[inner], s[inner])
        queries = FlowQueries(x=x, state=s, traj=b, row=torch.full_like(s, -1), x0=x0)
        traj = Trajectories(states=states, eps=eps, x0=torch.zeros_like(eps))
        return trajectory_records(traj, keep, torch.zeros(n, 1, 1), [0] * n, [""] * n, queries, None, need,
                                  timesteps=p.schedule.timesteps, meta=meta, actor=actor,
                                  eps_steps=needed_eps(keep, N, self.tc))


class GMMSamplerActor(SamplerLoop):
    def __init__(self, spec: GMMSpec, cfg: GMMBenchConfig, dcfg: DistributedConfig, index: int, redis_url: str,
                 run_id: str):
        tc = train_view(cfg, dcfg)
        super().__init__(dcfg, GMMSamplerPolicy(spec, cfg, tc, index), name=f"sampler-{index}",
                         redis_url=redis_url, run_id=run_id, sampler_kind=cfg.sampler.kind,
                         num_steps=cfg.sampler.num_steps)


# --------------------------------------------------------------------------------------- reward
class GMMScorer:
    """The exact reward: log R(x) and ∇ log R(x) at points (R, d) (a RewardWorker scorer)."""

    def __init__(self, spec: GMMSpec):
        self.spec = spec

    def __call__(self, x: torch.Tensor, prompts: list[str]):
        log_r = exact.log_reward(self.spec, x.double()).float()
        grad = exact.grad_log_reward(self.spec, x).float()
        valid = torch.isfinite(log_r) & torch.isfinite(grad).all(dim=1)
        return log_r, grad, valid


class GMMRewardWorker(RewardWorker):
    def __init__(self, spec: GMMSpec, cfg: GMMBenchConfig, dcfg: DistributedConfig, index: int, redis_url: str):
        torch.set_num_threads(cfg.threads)
        super().__init__(train_view(cfg, dcfg), index, redis_url, scorer=GMMScorer(spec))


# -------------------------------------------------------------------------------------- learner
class GMMLearnerModel:
    """The one-process `Trainer`'s networks and optimiser, trained on scored records (a `LearnerModel`)."""

    def __init__(self, spec: GMMSpec, cfg: GMMBenchConfig, tc: TrainConfig):
        torch.set_num_threads(cfg.threads)
        self.cfg, self.tc = cfg, tc
        self.problem = GMMProblem(spec, cfg.sampler)
        self.trainer = Trainer(self.problem, cfg)
        self.optimizer_steps = 0
        decay = float(getattr(cfg, "policy_ema", 0.0))
        self.ema_decay = decay
        self.ema = {n: p.detach().clone() for n, p in self.trainer.residual.named_parameters()} if decay > 0 else None

    def check(self, rec: ScoredRecord, run_id: str) -> None:
        from nablagfn.learner.record_batch import check_record

        check_record(rec, self.tc, self.problem.schedule.timesteps, run_id)

    def guess_table(self, data) -> torch.Tensor:
        """(B, N+1, d): β∇log R at state N, the guess β γ_t ∇_x log R(x̂₀(x)) at the queried states
        (∇_{x̂₀} log R from the reward service, chained through the guess's x̂₀ map)."""
        from nablagfn.learner.objectives.flow_param import flow_guess

        p, ob = self.problem, self.cfg.objective
        q, s = data.queries, data.scored
        N = p.schedule.num_steps
        table = torch.zeros_like(data.traj.states)
        term = q.state == N
        table[q.traj[term], N] = ob.reward_scale * s.grad[term]
        inner = ~term
        if ob.guess_x0_source != "none" and bool(inner.any()):
            idx = q.state[inner]
            table[q.traj[inner], idx] = flow_guess(q.x[inner], s.grad[inner], p.alpha_bar[idx], ob.reward_scale,
                                                   ob.gamma, self.trainer.x0_fn(idx), ob.x0_grad)
        return table

    def value_terms(self, data, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As `Trainer.value_targets` for states first … N−1: (V (B, N − first), the guess's value
        β γ_s log R(x̂₀(x_s)) (B, N+1)), with log R from the reward service and ℓ_s from the
        behaviour ε path the samplers carried."""
        from nablagfn.learner.objectives.flow_param import gamma_t
        from nablagfn.learner.objectives.nabla_db import log_flow_targets, log_ratio

        p, ob, tr = self.problem, self.cfg.objective, self.trainer
        q, s, states, eps = data.queries, data.scored, data.traj.states, data.traj.eps
        B, N = states.shape[0], p.schedule.num_steps
        vtab = torch.zeros(B, N + 1, dtype=states.dtype)
        term = q.state == N
        vtab[q.traj[term], N] = ob.reward_scale * s.log_r[term].to(states.dtype)
        inner = ~term
        if ob.guess_x0_source != "none" and bool(inner.any()):
            st = q.state[inner]
            vtab[q.traj[inner], st] = (ob.reward_scale * gamma_t(p.alpha_bar[st], ob.gamma)
                                       * s.log_r[inner].to(states.dtype))
        ell = torch.zeros(B, N - first, dtype=states.dtype)
        boot = torch.zeros(B, N - first + 1, dtype=states.dtype)
        with torch.no_grad():
            for i in range(first, N):
                idx = torch.full((B,), i, dtype=torch.long)
                x = states[:, i]
                pol, pre = p.step(x, eps[:, i], i), p.step(x, p.pretrained_eps(x, idx), i)
                ell[:, i - first] = log_ratio(states[:, i + 1], pol.mean, pre.mean, pre.std, ob.pretrained_strength)
                if ob.value_lambda < 1:
                    boot[:, i - first] = vtab[:, i] + tr.potential(tr.flow_bar, x, idx)
        return log_flow_targets(ell, vtab[:, N], boot, ob.value_lambda), vtab

    def train(self, records: list[ScoredRecord]) -> dict[str, Any]:
        """One step of the one-process `Trainer.update`, on the records' samples and rewards."""
        from nablagfn.learner.objectives.flow_param import flow_value
        from nablagfn.learner.objectives.nabla_db import TransitionBatch, stein_lambda_targets
        from nablagfn.learner.record_batch import update_data

        p, ob, tr = self.problem, self.cfg.objective, self.trainer
        data = update_data(records)
        states, keep = data.traj.states, data.keep
        B, N, K = states.shape[0], p.schedule.num_steps, keep.shape[1]
        table = self.guess_table(data)
        rows = torch.arange(B)[:, None].expand(B, K).reshape(-1)
        idx = keep.reshape(-1)
        stein_target = None
        if ob.backward_estimator == "stein_lambda" and not ob.no_flow:
            first = int(keep.min())

            def flow_bar_fn(z, i):
                return flow_value(tr.raw_flow(tr.flow_bar, z, i), table[:, int(i[0])], p.alpha_bar[i], ob.flow_output)

            T = stein_lambda_targets(states, p.alpha_bar, p.pretrained_eps, flow_bar_fn, table[:, N],
                                     ob.stein_lambda, p.sampler.kind, p.sampler.eta, first_step=first)
            stein_target = T[rows, idx - first]
        value = {}
        if getattr(ob, "value_loss_scale", 0.0) > 0 and not ob.no_flow:
            first = int(keep.min())
            V, vtab = self.value_terms(data, first)
            value = {"log_flow_target": V[rows, idx - first], "guess_value": vtab[rows, idx]}
        eps = data.traj.eps
        eps_beh = eps.reshape(B * K, -1) if data.traj.keep_idx is not None else eps[rows, idx]
        batch = TransitionBatch(
            x=states[rows, idx], x_next=states[rows, idx + 1], step_idx=idx, alpha_bar_t=p.alpha_bar[idx],
            alpha_bar_next=p.alpha_bar[idx + 1], is_last=idx == N - 1,
            eps_behaviour=eps_beh, guess=table[rows, idx], guess_next=table[rows, idx + 1],
            terminal_flow=table[rows, N], stein_target=stein_target, **value)
        logs = tr.optimize(batch)
        if self.ema is not None:  # the weight average evaluation samples from (bench.py's policy_ema)
            with torch.no_grad():
                for n, p_ in tr.residual.named_parameters():
                    self.ema[n].lerp_(p_.detach(), 1 - self.ema_decay)
        self.optimizer_steps += 1
        return logs

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.trainer.residual.state_dict().items()}

    def ema_state(self) -> Optional[dict[str, torch.Tensor]]:
        return None if self.ema is None else {k: v.clone() for k, v in self.ema.items()}

    def checkpoint(self) -> Checkpoint:
        tr = self.trainer
        return Checkpoint(lora=self.policy_state(), flow=tr.flow.state_dict(), flow_bar=tr.flow_bar.state_dict(),
                          optimizer=tr.opt.state_dict())

    def restore(self, ckpt: Checkpoint) -> None:
        tr = self.trainer
        tr.residual.load_state_dict(ckpt.lora)
        tr.flow.load_state_dict(ckpt.flow)
        tr.flow_bar.load_state_dict(ckpt.flow_bar)
        tr.opt.load_state_dict(ckpt.optimizer)


class GMMLearnerActor(StreamLearner):
    """The learner; with policy_ema it also publishes the weight average, as version v of `ema:*`."""

    def __init__(self, spec: GMMSpec, cfg: GMMBenchConfig, dcfg: DistributedConfig, redis_url: str, run_id: str,
                 run_dir: str):
        tc = train_view(cfg, dcfg, run_dir)
        super().__init__(dcfg, GMMLearnerModel(spec, cfg, tc), redis_url=redis_url, run_id=run_id,
                         run_dir=run_dir, batch_size=cfg.batch_trajectories, updates=cfg.updates)

    def publish(self) -> int:
        version = super().publish()
        ema = self.model.ema_state()
        if ema is not None:
            ema_registry(self.registry.conn, self.keys, self.dcfg).publish(ema, version=version)
        return version


def ema_registry(conn, keys, dcfg: DistributedConfig):
    from nablagfn.common.transport import LoraRegistry

    return LoraRegistry(conn, prefix=keys.key("ema"), keep=dcfg.redis.lora_keep_versions)


# --------------------------------------------------------------------------------------- runner
class PolicyEvaluator:
    """Samples the latest published policy in the driver process (fresh noise per evaluation): the
    weight average when policy_ema is on (as the one-process benchmark reports), and the online
    iterate beside it (`*_online`)."""

    def __init__(self, spec: GMMSpec, cfg: GMMBenchConfig, registry, ema=None):
        self.cfg, self.registry, self.ema = cfg, registry, ema
        self.policy = GMMSamplerPolicy(spec, cfg, train_view(cfg, default_distributed(cfg)), index=999)

    def _measure(self, registry, version, n: int, seed: int) -> tuple[int, dict]:
        v, state, _ = registry.fetch_with_metadata(version, self.policy.expected_shapes())
        self.policy.load(state)
        s, _ = self.policy.problem.sample(self.policy.policy_eps, n, torch.Generator().manual_seed(seed))
        return v, {"samples": s[:, -1], **measure(self.policy.problem, s[:, -1])}

    def __call__(self, n: int, seed: int) -> tuple[int, dict]:
        version, online = self._measure(self.registry, None, n, seed)
        if self.ema is None:
            return version, online
        _, avg = self._measure(self.ema, version, n, seed)
        return version, {**avg, "tv_online": online["tv"], "mean_log_reward_online": online["mean_log_reward"]}


def run_gmm_distributed(spec: GMMSpec, cfg: GMMBenchConfig, out_dir: str | Path, *, progress: bool = True,
                        compare_local: bool = False, dcfg: Optional[DistributedConfig] = None) -> dict:
    """Train `cfg` on `spec` through the service (see the module docstring); writes summary.json,
    curve.jsonl and samples.npy to out_dir and returns the summary."""
    import ray
    from tqdm import tqdm

    from nablagfn.common.transport import LoraRegistry, StreamClient, start_embedded_redis
    from nablagfn.common.transport.keys import LEARNER_GROUP, REWARD_GROUP, RunKeys
    from nablagfn.driver import DriverError, MetricsTail, local_resources, role_options

    check_supported(cfg)
    dcfg = dcfg or default_distributed(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    run_id = f"gmm-{spec.name}-{cfg.seed}"
    keys = RunKeys.from_config(dcfg)
    curve: list[dict] = []
    (out / "curve.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nablagfn-gmm-dist-") as tmp:
        server = start_embedded_redis(Path(tmp) / "redis")
        client = StreamClient.from_config(dcfg.redis, server.url)
        started = False
        actors: list = []
        try:
            for st in keys.traj_streams:
                client.ensure_group(st, REWARD_GROUP)
            for st in keys.scored_streams:
                client.ensure_group(st, LEARNER_GROUP)
            if not ray.is_initialized():
                need = local_resources(train_view(cfg, dcfg))
                ray.init(address="local", num_cpus=need["num_cpus"], resources=need["resources"] or None,
                         include_dashboard=False, log_to_driver=False, logging_level="WARNING")
                started = True
            learner = ray.remote(GMMLearnerActor).options(**role_options(dcfg.learner)).remote(
                spec, cfg, dcfg, server.url, run_id, str(Path(tmp) / "learner"))
            workers = [ray.remote(GMMRewardWorker).options(**role_options(dcfg.reward)).remote(
                spec, cfg, dcfg, i, server.url) for i in range(dcfg.num_reward_workers)]
            samplers = [ray.remote(GMMSamplerActor).options(**role_options(dcfg.sampler)).remote(
                spec, cfg, dcfg, i, server.url, run_id) for i in range(dcfg.num_samplers)]
            actors = [learner] + workers + samplers
            ray.get([a.ready.remote() for a in actors], timeout=dcfg.startup_timeout_s)
            registry = LoraRegistry(client.conn, prefix=keys.lora_prefix, keep=dcfg.redis.lora_keep_versions)
            ema = ema_registry(client.conn, keys, dcfg) if getattr(cfg, "policy_ema", 0.0) > 0 else None
            evaluate = PolicyEvaluator(spec, cfg, registry, ema)

            def log_eval(u: int) -> None:
                version, m = evaluate(cfg.eval_samples, cfg.seed + 1000 + u)
                curve.append({"update": u, "version": version, "tv": m["tv"], "mean_log_reward": m["mean_log_reward"],
                              **{k: m[k] for k in ("tv_online", "mean_log_reward_online") if k in m},
                              "seconds": time.perf_counter() - t0})
                with open(out / "curve.jsonl", "a") as fh:
                    fh.write(json.dumps(curve[-1]) + "\n")

            log_eval(0)
            t_train = time.perf_counter()
            learner_ref = learner.run.remote()
            other_refs = [a.run.remote() for a in workers + samplers]
            tail = MetricsTail(client, keys.metrics_stream)
            bar = tqdm(total=cfg.updates, desc=f"{spec.name} distributed", disable=not progress, mininterval=1.0)
            lags: list[int] = []
            last_eval = 0
            while True:
                for m in tail.poll(block_ms=200):
                    lags += [m["trained_at_version"] - v for v in m["sampled_versions"]]
                    bar.n = m["update"]
                    bar.refresh()
                done, _ = ray.wait([learner_ref] + other_refs, num_returns=1 + len(other_refs), timeout=0)
                for ref in done:
                    if ref is not learner_ref:
                        ray.get(ref)
                        raise DriverError("an actor stopped before the learner finished")
                if bar.n - last_eval >= cfg.eval_every and bar.n < cfg.updates:
                    last_eval = bar.n - bar.n % cfg.eval_every
                    log_eval(last_eval)
                    bar.set_postfix(tv=f"{curve[-1]['tv']:.3f}")
                if learner_ref in done:
                    learner_stats = ray.get(learner_ref)
                    break
            bar.close()
            train_seconds = time.perf_counter() - t_train
            for m in tail.poll(block_ms=1):
                lags += [m["trained_at_version"] - v for v in m["sampled_versions"]]
            client.conn.client.set(keys.stop_key, 1)
            other_stats = ray.get(other_refs, timeout=dcfg.startup_timeout_s)
            log_eval(cfg.updates)
            version, final = evaluate(cfg.final_samples, cfg.seed + 99)
        finally:
            try:
                client.conn.client.set(keys.stop_key, 1)
            except Exception:  # noqa: BLE001 - best effort while failing
                pass
            for a in actors:
                ray.kill(a)
            if started:
                ray.shutdown()
            client.close()
            server.stop()
    np.save(out / "samples.npy", final["samples"].double().numpy())
    from .gmm.bench import reference_figures

    refs = reference_figures(GMMProblem(spec, cfg.sampler), cfg.final_samples, cfg.seed)
    summary = {
        "spec": spec.name, "method": cfg.method, "seed": cfg.seed, "mode": "distributed",
        "tv": final["tv"], "tv_online": final.get("tv_online"), "empirical_weights": final["empirical_weights"],
        "target_weights": refs["target_weights"],
        "mean_log_reward": final["mean_log_reward"], "target_mean_log_reward": refs["target_mean_log_reward"],
        "updates": learner_stats["updates"], "final_version": version, "wall_seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds, "pretrained": refs["pretrained"], "exact_flow": refs["exact_flow"],
        "flow_error": None,  # g_φ lives in the learner actor; the one-process run reports it
        "policy_lag": {"mean": float(np.mean(lags)) if lags else None, "max": max(lags, default=None),
                       "histogram": {str(k): lags.count(k) for k in sorted(set(lags))}},
        "learner": learner_stats, "samplers": other_stats[len(workers):], "reward_workers": other_stats[:len(workers)],
        "distributed": to_dict(dcfg), "curve": curve, "config": to_dict(cfg),
    }
    if compare_local:
        from .gmm.bench import run_gmm_bench

        local = run_gmm_bench(spec, copy.deepcopy(cfg), out / "one_process", progress=progress)
        summary["one_process_tv"] = local["tv"]
        summary["tv_difference"] = summary["tv"] - local["tv"]
        summary["within_tolerance"] = abs(summary["tv_difference"]) <= COMPARE_TOLERANCE
        summary["tolerance"] = COMPARE_TOLERANCE
        summary["one_process_train_seconds"] = local.get("train_seconds")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
