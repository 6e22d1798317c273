"""`LearnerActor`: consumes scored records, trains the LoRA policy and g_φ, publishes LoRA versions.

Two parts: `StreamLearner`, the transport side (what to train on, versions, acks, checkpoints —
independent of the model), and a model object that trains (`DiffusionLearnerModel` here: the
diffusion policy with `NablaDBLearner`; the GMM testbed brings its own). `LearnerActor` is the
two together for the diffusion path.

Versions: at start the learner publishes its current policy as a new version (0 on a fresh run,
latest + 1 on a restart), so every sampler begins from the learner's exact weights, and again
after every `publish_every` updates. `version` is the last published one.

One update (`StreamLearner.update`):
1. collect `batch_size` records from `stream:scored` (group `learner`; at start, entries a
   previous incarnation left pending are reclaimed first). Each record is decoded and validated
   (schema, sizes, finite values), then checked against this run and model (`model.check`); a bad
   one is dead-lettered with the reason. A record whose traj_id was already trained on (or is
   already in the batch) is a redelivery: acked and counted, never trained twice. A record sampled
   more than `max_policy_lag` versions ago (version − policy_version > max_policy_lag) is acked,
   dropped and counted. So every trained record satisfies policy_version ≥ version − max_policy_lag.
2. `model.train(records)`: for the diffusion path `record_batch.update_data` + `NablaDBLearner.learn`
   — the same update as the one-process trainer, with the chain rule to x_t and the Stein targets
   computed here.
3. publish every `publish_every` updates; append one metrics map to `stream:metrics` (the driver
   tails it); checkpoint every `checkpoint_every` updates (policy, g_φ, its Polyak copy,
   optimizer, version, counters, seen ids, the entries about to be acked) and only then XACK the
   trained entries: after a crash, what was not checkpointed is redelivered and trained again from
   the restored state, and what was is never trained twice (its ids are in the checkpoint; its
   entries are acked again at resume, counted once). With checkpoint_every = 0 there are no
   checkpoints and entries are acked right after the update. Trained ids are remembered while
   their records could still be admitted (policy_version within max_policy_lag of the current
   version); an older redelivery is dropped as stale anyway.
Every ack and dead letter also counts the record in the run's accounting in the same server-side
step (common/transport/accounting.py: trained, dropped_stale, duplicates, dead_lettered).

Exactly-once metrics across restarts: at start the learner appends an event
{"event": "start", "update": U, ...} to `stream:metrics`, U being the update count it resumes at
(its checkpoint's; 0 on a fresh run). Metrics of updates after U that a dead incarnation appended
are redone by this one, so the driver drops its lines with update > U. The metrics of an update are
appended before its checkpoint, so no checkpointed update lacks them.
It never samples trajectories.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from nablagfn.common.config import DistributedConfig, TrainConfig
from nablagfn.common.config_io import validate
from nablagfn.common.metrics import start_role_metrics
from nablagfn.common.transport import (LoraRegistry, RecordError, ScoredRecord, StreamClient,
                                       encode)
from nablagfn.common.transport.accounting import Accounting
from nablagfn.common.transport.keys import LEARNER_GROUP, RunKeys

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .policy_model import PipelinePolicyModel

METRICS_MAXLEN = 100_000
CONSUMER = "learner"


def optimizer_fingerprint(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A small summary of an optimizer state_dict (per-parameter step counts, sums of the moment
    tensors) to compare a checkpoint with what a restarted learner holds."""
    steps, sums = [], {}
    for st in state_dict.get("state", {}).values():
        for k, v in st.items():
            if k == "step":
                steps.append(int(float(v)))
            elif isinstance(v, torch.Tensor):
                sums[k] = sums.get(k, 0.0) + float(v.detach().double().sum())
    return {"params": len(state_dict.get("state", {})), "steps": sorted(set(steps)), "sums": sums}


class LearnerModel(Protocol):
    """What `StreamLearner` needs from the thing it trains."""

    optimizer_steps: int

    def check(self, rec: ScoredRecord, run_id: str) -> None:
        """Raise RecordError (naming the field) unless `rec` fits this run and model."""

    def train(self, records: list[ScoredRecord]) -> dict[str, Any]:
        """One update on `records`; its logged terms."""

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The weights samplers load (published as a version)."""

    def checkpoint(self) -> Checkpoint:
        """Everything needed to resume (state left empty: StreamLearner fills it)."""

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a `checkpoint()` output back."""


class StreamLearner:
    """The transport side of a learner (see the module docstring) around a `LearnerModel`."""

    def __init__(self, dcfg: DistributedConfig, model: LearnerModel, *, redis_url: str, run_id: str,
                 run_dir: str | Path, batch_size: int, updates: int):
        self.dcfg, self.model, self.run_id = dcfg, model, run_id
        self.run_dir = Path(run_dir)
        self.batch_size, self.target_updates = int(batch_size), int(updates)
        self.keys = RunKeys.from_config(dcfg)
        self.streams = StreamClient.from_config(dcfg.redis, redis_url)
        self.accounting = Accounting(self.streams, self.keys.accounting)
        for stream in self.keys.scored_streams:
            self.streams.ensure_group(stream, LEARNER_GROUP)
        self.registry = LoraRegistry(self.streams.conn, prefix=self.keys.lora_prefix,
                                     keep=dcfg.redis.lora_keep_versions, max_bytes=dcfg.redis.max_lora_bytes)
        self.updates = 0
        self.version = -1
        self.seen: dict[str, int] = {}  # traj_id -> policy_version of every record trained and still admissible
        self.counters = {"trained": 0, "dropped_stale": 0, "duplicates": 0, "dead_lettered": 0,
                         "checkpoints": 0, "publishes": 0, "seconds_learn": 0.0, "seconds_wait": 0.0,
                         "seconds_publish": 0.0, "seconds_checkpoint": 0.0}
        self.pending: list[tuple[str, str]] = []  # trained entries to ack after the next checkpoint
        self.restored: dict[str, Any] = {}
        self.resumed = self._resume()
        self._ack_pending()  # the checkpoint's entries, in case the dead incarnation did not ack them
        self._reclaim_own = True
        self.metrics = start_role_metrics(dcfg.metrics, "learner", 0, self.streams.conn, self.keys)
        self.publish()
        self._append_metrics({"event": "start", "update": self.updates, "version": self.version,
                              "resumed": self.resumed, "optimizer_steps": self.model.optimizer_steps,
                              "restored": self.restored})

    # -- state ----------------------------------------------------------------------------------
    def _resume(self) -> bool:
        ckpt = load_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        st = ckpt.state
        if st.get("run_id") != self.run_id:
            raise RuntimeError(f"{self.run_dir}/checkpoint belongs to run {st.get('run_id')!r}, not "
                               f"{self.run_id!r}: use a fresh run_dir or the same run id")
        in_checkpoint = optimizer_fingerprint(ckpt.optimizer)
        self.model.restore(ckpt)
        self.model.optimizer_steps = int(st["optimizer_steps"])
        self.updates, self.version = int(st["updates"]), int(st["version"])
        self.seen = {k: int(v) for k, v in st["seen"].items()}
        self.counters.update(st["counters"])
        self.pending = [(str(a), str(b)) for a, b in st.get("unacked", [])]
        self.restored = {"update": self.updates, "version": self.version,
                         "optimizer_steps": self.model.optimizer_steps, "checkpoint_optimizer": in_checkpoint,
                         "live_optimizer": optimizer_fingerprint(self.model.checkpoint().optimizer)}
        return True

    def checkpoint(self) -> None:
        """Save the checkpoint, then ack the entries trained since the last one."""
        t0 = time.perf_counter()
        ckpt = self.model.checkpoint()
        self.counters["checkpoints"] += 1
        ckpt.state = {"run_id": self.run_id, "updates": self.updates, "version": self.version,
                      "optimizer_steps": self.model.optimizer_steps, "counters": self.counters,
                      "seen": self.seen, "unacked": [list(p) for p in self.pending]}
        save_checkpoint(self.run_dir, ckpt)
        self._ack_pending()
        self.counters["seconds_checkpoint"] += time.perf_counter() - t0

    def _ack_pending(self) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in self.pending:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            self.accounting.ack(stream, LEARNER_GROUP, ids, "trained")
        self.pending = []

    def publish(self) -> int:
        """Publish the current policy as the next version; returns it."""
        t0 = time.perf_counter()
        latest = self.registry.latest_version()
        new = max(self.version, -1 if latest is None else latest) + 1
        self.version = self.registry.publish(self.model.policy_state(), version=new)
        # a redelivered record older than the lag bound is dropped as stale anyway: forget its id
        self.seen = {k: v for k, v in self.seen.items() if self.version - v <= self.dcfg.max_policy_lag}
        self.counters["publishes"] += 1
        self.counters["seconds_publish"] += time.perf_counter() - t0
        self.metrics.lora_version(self.version, time.perf_counter() - t0)
        return self.version

    # -- data -----------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        return {"version": self.version, "updates": self.updates, "resumed": self.resumed}

    def stop_requested(self) -> bool:
        return bool(self.streams.conn.call(self.streams.conn.client.exists, self.keys.stop_key))

    def _take(self, n: int) -> list[tuple[str, str, bytes]]:
        if self._reclaim_own:  # entries a previous incarnation of the learner read but never acked
            out = []
            for stream in self.keys.scored_streams:
                out += [(stream, i, p) for i, p in self.streams.reclaim(stream, LEARNER_GROUP, CONSUMER, 0, count=n)]
            if out:
                return out
            self._reclaim_own = False
        return self.streams.read_many(self.keys.scored_streams, LEARNER_GROUP, CONSUMER, count=n,
                                      block_ms=self.dcfg.block_ms)

    def _admit(self, stream: str, entry_id: str, payload: bytes, batch_ids: set[str]) -> Optional[ScoredRecord]:
        """The record if it may be trained now; otherwise it is dead-lettered or acked + counted."""
        try:
            rec = ScoredRecord.from_msg(payload, self.dcfg.redis.max_record_bytes)
            self.model.check(rec, self.run_id)
            if rec.policy_version > self.version:
                raise RecordError(f"meta.policy_version: {rec.policy_version} is newer than the learner's "
                                  f"{self.version}")
        except RecordError as exc:
            self.accounting.dead_letter(stream, LEARNER_GROUP, entry_id, payload, exc.reason)
            self.counters["dead_lettered"] += 1
            return None
        if rec.traj_id in self.seen or rec.traj_id in batch_ids:
            self.accounting.ack(stream, LEARNER_GROUP, entry_id, "duplicates")
            self.counters["duplicates"] += 1
            return None
        if self.version - rec.policy_version > self.dcfg.max_policy_lag:
            self.accounting.ack(stream, LEARNER_GROUP, entry_id, "dropped_stale")
            self.counters["dropped_stale"] += 1
            return None
        return rec

    def collect(self, n: int) -> Optional[list[tuple[str, str, ScoredRecord]]]:
        """n admissible records (None if the stop key is set first)."""
        batch: list[tuple[str, str, ScoredRecord]] = []
        ids: set[str] = set()
        while len(batch) < n:
            if self.stop_requested():
                return None
            for stream, entry_id, payload in self._take(n - len(batch)):
                rec = self._admit(stream, entry_id, payload, ids)
                if rec is not None:
                    batch.append((stream, entry_id, rec))
                    ids.add(rec.traj_id)
        return batch

    # -- training -------------------------------------------------------------------------------
    def update(self) -> Optional[dict[str, Any]]:
        """One update (see the module docstring); its metrics, or None if stopped while waiting."""
        t0 = time.perf_counter()
        batch = self.collect(self.batch_size)
        if batch is None:
            return None
        t1 = time.perf_counter()
        records = [rec for _, _, rec in batch]
        trained_at = self.version
        logs = self.model.train(records)
        t2 = time.perf_counter()
        self.updates += 1
        self.seen.update((r.traj_id, r.policy_version) for r in records)
        self.pending += [(s, i) for s, i, _ in batch]
        self.counters["trained"] += len(records)
        self.counters["seconds_wait"] += t1 - t0
        self.counters["seconds_learn"] += t2 - t1
        if self.updates % self.dcfg.publish_every == 0:
            self.publish()
        log_r = torch.tensor([r.log_reward for r in records], dtype=torch.float64)
        lags = [trained_at - r.policy_version for r in records]
        metrics = {"update": self.updates, "version": self.version, "trained_at_version": trained_at,
                   "reward_mean": float(log_r.mean()), "reward_std": float(log_r.std(unbiased=False)),
                   **logs, "lag_mean": sum(lags) / len(lags), "lag_max": max(lags),
                   "dropped_stale_total": self.counters["dropped_stale"],
                   "duplicates_total": self.counters["duplicates"],
                   "dead_lettered_total": self.counters["dead_lettered"],
                   "seconds_wait": t1 - t0, "seconds_learn": t2 - t1, "seconds": time.perf_counter() - t0,
                   "traj_ids": [r.traj_id for r in records],
                   "sampled_versions": [r.policy_version for r in records]}
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.metrics.learner_update(metrics, logs, lags, sum(r.num_kept for r in records), self.counters,
                                    self.streams, self.keys)
        self._append_metrics(metrics)  # before the checkpoint: a checkpointed update has its metrics
        if not self.dcfg.checkpoint_every:
            self._ack_pending()  # no checkpoints: nothing to resume from, ack at once
        elif self.updates % self.dcfg.checkpoint_every == 0:
            self.checkpoint()
        return metrics

    def _append_metrics(self, row: dict[str, Any]) -> None:
        self.streams.conn.call(self.streams.conn.client.xadd, self.keys.metrics_stream,
                               {b"d": encode(row)}, maxlen=METRICS_MAXLEN, approximate=True)

    def run(self, updates: Optional[int] = None) -> dict[str, Any]:
        """Updates until `updates` in total (default: the configured count; a resumed learner counts
        those it had done) or the stop key; then a final checkpoint. Returns `stats()`."""
        target = self.target_updates if updates is None else updates
        while self.updates < target:
            if self.update() is None:
                break
        if self.pending:
            self.checkpoint() if self.dcfg.checkpoint_every else self._ack_pending()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {"actor": CONSUMER, "updates": self.updates, "version": self.version,
                "optimizer_steps": self.model.optimizer_steps, **self.counters, "resumed": self.resumed,
                "restored": self.restored}

    def close(self) -> None:
        self.metrics.close()
        self.streams.close()


class DiffusionLearnerModel(PipelinePolicyModel):
    """The diffusion policy (pipeline + LoRA), g_φ and `NablaDBLearner`, as a `LearnerModel`."""

    def __init__(self, cfg: TrainConfig, cache_dir: Optional[str] = None):
        from nablagfn.common.models import FlowNet

        from .nabla_db_step import NablaDBLearner, PolicyModels

        super().__init__(cfg, cache_dir)
        flow_net = None
        if not cfg.objective.no_flow:
            flow_net = FlowNet.from_pipeline(cfg.flow_net, self.pipe).to(self.device)
        self.models = PolicyModels(self.denoiser, flow_net, self.schedule, self.denoiser.encode_prompts([""]),
                                   cfg.sampler.guidance_scale, self.device)
        self.learner = NablaDBLearner(cfg, self.models)

    def train(self, records: list[ScoredRecord]) -> dict[str, Any]:
        from .record_batch import update_data

        return self.learner.learn(update_data(records, self.device))

    def checkpoint(self) -> Checkpoint:
        m = self.models
        return Checkpoint(lora=self.policy_state(),
                          flow={} if m.flow_net is None else m.flow_net.state_dict(),
                          flow_bar={} if m.flow_bar is None else m.flow_bar.state_dict(),
                          optimizer=self.learner.opt.state_dict())

    def restore(self, ckpt: Checkpoint) -> None:
        self.restore_policy(ckpt.lora, ckpt.optimizer)
        if self.models.flow_net is not None:
            self.models.flow_net.load_state_dict(ckpt.flow)
            self.models.flow_bar.load_state_dict(ckpt.flow_bar)


def build_learner_model(cfg: TrainConfig, cache_dir: Optional[str] = None) -> LearnerModel:
    """The model of `cfg.method`: residual ∇-DB (`DiffusionLearnerModel`) or a baseline
    (learner/baseline_model.py)."""
    if cfg.method == "residual-nabla-db":
        return DiffusionLearnerModel(cfg, cache_dir)
    from .baseline_model import BaselineLearnerModel

    return BaselineLearnerModel(cfg, cache_dir)


class LearnerActor(StreamLearner):
    """The learner of a distributed diffusion run: `StreamLearner` around the model of `cfg.method`."""

    def __init__(self, cfg: TrainConfig, redis_url: str, run_id: str, cache_dir: Optional[str] = None):
        validate(cfg)
        self.cfg = cfg
        super().__init__(cfg.distributed, build_learner_model(cfg, cache_dir), redis_url=redis_url,
                         run_id=run_id, run_dir=cfg.run_dir, batch_size=cfg.batch_trajectories,
                         updates=cfg.updates)

    def finalize(self) -> dict[str, str]:
        return self.model.finalize(self.run_dir)
