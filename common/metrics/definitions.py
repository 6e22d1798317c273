"""Every Prometheus metric nablagfn exports, in one place: name, type, help, label names.

Each process (sampler actor, reward worker, learner) builds its own `CollectorRegistry` from
`METRICS` (`build_metrics`); every metric carries the labels `role` (sampler | reward | learner),
`index` (the actor's index within its role) and `node` (the Ray node IP, or the host name), plus
the extra labels listed here. Rates (trajectories/s, samples/s) are PromQL's job:
`rate(nablagfn_trajectories_total[1m])`.

What counts as a trajectory / a sample, per role:
- sampler: trajectories sampled and published; samples = denoising steps (trajectories × num_steps);
- reward: trajectories scored and passed on; samples = reward evaluations (final latents and x̂₀
  queries decoded through the VAE);
- learner: trajectories trained on; samples = kept transitions trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "nablagfn_"
ROLE_LABELS = ("role", "index", "node")


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

METRICS: dict[str, MetricSpec] = {
    # throughput (all roles)
    "trajectories_total": MetricSpec("counter", "Trajectories sampled (sampler), scored (reward) or trained on (learner)."),
    "samples_total": MetricSpec("counter", "Denoising steps (sampler), reward evaluations (reward) or trained transitions (learner)."),
    "paused_seconds_total": MetricSpec("counter", "Seconds spent waiting for room in a full downstream stream (backpressure)."),
    # queues
    "stream_depth": MetricSpec("gauge", "Entries in a Redis stream (the un-acked backlog), as last seen by this process.", ("stream",)),
    # sampler
    "sampler_round_seconds": MetricSpec("histogram", "Seconds per sampler round (sample + publish).", buckets=_SECONDS),
    "lora_loads_total": MetricSpec("counter", "LoRA versions a sampler fetched and loaded."),
    # reward
    "reward_latency_seconds": MetricSpec("histogram", "Seconds to score one batch of trajectory records (VAE decode + reward + gradient).", buckets=_SECONDS),
    "reward_grad_norm": MetricSpec("gauge", "Mean L2 norm of ∇ log R per scored latent in the last batch."),
    "non_finite_rewards_total": MetricSpec("counter", "Records with a non-finite log R or gradient (dead-lettered)."),
    "reclaimed_total": MetricSpec("counter", "Stream entries taken over from a dead or stuck consumer (XAUTOCLAIM)."),
    # learner
    "learner_updates_total": MetricSpec("counter", "Learner updates done."),
    "learner_step_seconds": MetricSpec("histogram", "Seconds of compute per learner update (train, excluding the wait for data).", buckets=_SECONDS),
    "learner_wait_seconds": MetricSpec("histogram", "Seconds a learner update waited for scored records.", buckets=_SECONDS),
    "learner_busy_fraction": MetricSpec("gauge", "Fraction of the learner's time spent computing (learn / (learn + wait)), since start."),
    "policy_lag": MetricSpec("histogram", "Versions between the policy that sampled a trained trajectory and the one trained.", buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20)),
    "loss": MetricSpec("gauge", "Each logged loss term of the last update (term = its name).", ("term",)),
    "reward_mean": MetricSpec("gauge", "Mean log R of the last update's batch."),
    "reward_std": MetricSpec("gauge", "Standard deviation of log R over the last update's batch."),
    "lora_version": MetricSpec("gauge", "LoRA version published (learner) or loaded (sampler)."),
    "lora_publish_seconds": MetricSpec("histogram", "Seconds to publish one LoRA version to the registry.", buckets=_SECONDS),
    "dropped_total": MetricSpec("counter", "Records acked without training: stale (policy lag) or duplicate (redelivered).", ("reason",)),
    # every role
    "dead_lettered_total": MetricSpec("counter", "Records moved to a dead-letter stream (bad schema, shapes, values or rewards)."),
    "process_resident_memory_bytes": MetricSpec("gauge", "Resident memory of the process (read at scrape time)."),
    "gpu_memory_allocated_bytes": MetricSpec("gauge", "torch.cuda memory allocated, per device (read at scrape time; only with CUDA).", ("device",)),
    "gpu_memory_reserved_bytes": MetricSpec("gauge", "torch.cuda memory reserved by the caching allocator, per device (only with CUDA).", ("device",)),
}
"""Names without the `nablagfn_` prefix. The two memory gauges come from `ProcessCollector` at scrape time."""

SCRAPE_TIME = ("process_resident_memory_bytes", "gpu_memory_allocated_bytes", "gpu_memory_reserved_bytes")


def full_name(name: str) -> str:
    return PREFIX + name


def exported_names() -> set[str]:
    """Every series name a scrape can show: counters' `_total` (and `_created`), histograms'
    `_bucket`/`_sum`/`_count`, gauges as is."""
    out = set()
    for name, spec in METRICS.items():
        full = full_name(name)
        if spec.kind == "counter":
            base = full[:-len("_total")] if full.endswith("_total") else full
            out |= {base + "_total", base + "_created"}
        elif spec.kind == "histogram":
            out |= {full + "_bucket", full + "_sum", full + "_count", full + "_created"}
        else:
            out.add(full)
    return out


def build_metrics(registry: CollectorRegistry) -> dict[str, object]:
    """The metric objects of `METRICS` registered in `registry` (scrape-time ones excluded)."""
    out: dict[str, object] = {}
    for name, spec in METRICS.items():
        if name in SCRAPE_TIME:
            continue
        labels = ROLE_LABELS + spec.labels
        if spec.kind == "counter":
            out[name] = Counter(full_name(name), spec.help, labels, registry=registry)
        elif spec.kind == "gauge":
            out[name] = Gauge(full_name(name), spec.help, labels, registry=registry)
        elif spec.kind == "histogram":
            out[name] = Histogram(full_name(name), spec.help, labels, registry=registry, buckets=spec.buckets)
        else:
            raise ValueError(f"METRICS[{name!r}].kind: unknown {spec.kind!r}")
    return out
