"""`RoleMetrics`: the metrics of one sampler / reward worker / learner process, with the few hook
methods the role loops call. Counters mirror the loops' own `counters` dicts (`sync`: the
increase since the last call), so the loops keep one source of truth. With `enabled=False` every
hook returns at once and nothing is served (the overhead benchmark's baseline)."""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional

from prometheus_client import CollectorRegistry

from .definitions import build_metrics
from .process import ProcessCollector
from .server import node_address, serve

# loop counter name -> (metric name, extra label values); per role
COUNTER_MAP: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "sampler": {"records": ("trajectories_total", ()), "lora_loads": ("lora_loads_total", ()),
                "seconds_paused": ("paused_seconds_total", ())},
    "reward": {"scored": ("trajectories_total", ()), "dead_lettered": ("dead_lettered_total", ()),
               "reclaimed": ("reclaimed_total", ()), "non_finite": ("non_finite_rewards_total", ()),
               "seconds_paused": ("paused_seconds_total", ())},
    "learner": {"trained": ("trajectories_total", ()), "dead_lettered": ("dead_lettered_total", ()),
                "dropped_stale": ("dropped_total", ("stale",)), "duplicates": ("dropped_total", ("duplicate",))},
}


def index_from_name(name: str) -> int:
    """The actor index in a name like `sampler-3` (0 when the name carries none)."""
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else 0


class RoleMetrics:
    def __init__(self, role: str, index: int, *, enabled: bool = True, node: Optional[str] = None):
        if role not in COUNTER_MAP:
            raise ValueError(f"role: must be one of {sorted(COUNTER_MAP)}, got {role!r}")
        self.role, self.index, self.enabled = role, int(index), bool(enabled)
        self.node = node or node_address()
        self.labels = (role, str(self.index), self.node)
        self.registry = CollectorRegistry()
        self.m = build_metrics(self.registry)
        self.registry.register(ProcessCollector(self.labels))
        self._synced: dict[str, float] = {}
        self._children: dict[tuple, Any] = {}
        self.url: Optional[str] = None
        self._server = None
        # counters show from the first scrape (at 0), so `rate()` and "exists" work before work is done
        for key, (name, extra) in COUNTER_MAP[role].items():
            self._child(name, extra)
        self._child("samples_total")

    def _child(self, name: str, extra: tuple[str, ...] = ()):
        key = (name, extra)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.m[name].labels(*self.labels, *extra)
        return child

    # -- serving ------------------------------------------------------------------------------------
    def serve(self, bind_address: str, port_range: tuple[int, int]) -> Optional[str]:
        """Start the HTTP endpoint (if enabled); its URL."""
        if self.enabled and self._server is None:
            self.url, self._server = serve(self.registry, bind_address, port_range)
        return self.url

    def endpoint(self) -> dict[str, Any]:
        return {"url": self.url, "role": self.role, "index": self.index, "node": self.node}

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- hooks --------------------------------------------------------------------------------------
    def sync(self, counters: dict[str, float]) -> None:
        """Add to the mirrored counters what the loop's `counters` gained since the last call."""
        if not self.enabled:
            return
        for key, (name, extra) in COUNTER_MAP[self.role].items():
            value = float(counters.get(key, 0))
            delta = value - self._synced.get(key, 0.0)
            if delta > 0:
                self._child(name, extra).inc(delta)
            self._synced[key] = value

    def stream_depths(self, depths: dict[str, int]) -> None:
        if not self.enabled:
            return
        for stream, depth in depths.items():
            self._child("stream_depth", (stream,)).set(depth)

    def lora_version(self, version: Optional[int], publish_seconds: Optional[float] = None) -> None:
        if not self.enabled or version is None:
            return
        self._child("lora_version").set(version)
        if publish_seconds is not None:
            self._child("lora_publish_seconds").observe(publish_seconds)

    def sampler_round(self, trajectories: int, num_steps: int, seconds: float, counters: dict) -> None:
        """One sampler round: trajectories × num_steps denoising steps, its duration, the counters."""
        if not self.enabled:
            return
        self._child("samples_total").inc(trajectories * num_steps)
        self._child("sampler_round_seconds").observe(seconds)
        self.sync(counters)

    def reward_batch(self, seconds: float, results: list) -> None:
        """One scored batch (`RewardWorker.score`'s results: ScoredRecords, or the reason a record
        was rejected): its latency, the reward evaluations (final latent + x̂₀ queries per scored
        record) and the mean ‖∇ log R‖ of the final latents."""
        if not self.enabled:
            return
        self._child("reward_latency_seconds").observe(seconds)
        scored = [r for r in results if not isinstance(r, str)]
        rows = sum(1 + (int(r.tensors["query_grad"].shape[0]) if "query_grad" in r.tensors else 0) for r in scored)
        self._child("samples_total").inc(rows)
        if scored:
            import torch

            norms = torch.stack([r.tensors["grad_final"].float().norm() for r in scored])
            norms = norms[torch.isfinite(norms)]
            if norms.numel():
                self._child("reward_grad_norm").set(float(norms.mean()))

    def learner_update(self, metrics: dict[str, Any], logs: dict[str, Any], lags: Iterable[int],
                       transitions: int, counters: dict, streams=None, keys=None) -> None:
        """One learner update: step/wait time, busy fraction, lag of each record, loss terms,
        reward mean/std, the counters, and (given `streams`/`keys`) the depth of every stream of
        the run — the learner reads them once per update for the whole service."""
        if not self.enabled:
            return
        if streams is not None and keys is not None:
            self.stream_depths({s: streams.depth(s) for s in keys.traj_streams + keys.scored_streams})
        self._child("learner_updates_total").inc()
        self._child("samples_total").inc(transitions)
        self._child("learner_step_seconds").observe(metrics["seconds_learn"])
        self._child("learner_wait_seconds").observe(metrics["seconds_wait"])
        learn, wait = counters.get("seconds_learn", 0.0), counters.get("seconds_wait", 0.0)
        if learn + wait > 0:
            self._child("learner_busy_fraction").set(learn / (learn + wait))
        hist = self._child("policy_lag")
        for lag in lags:
            hist.observe(lag)
        for term, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._child("loss", (str(term),)).set(value)
        for key in ("reward_mean", "reward_std"):
            if metrics.get(key) is not None:
                self._child(key).set(metrics[key])
        self.sync(counters)
