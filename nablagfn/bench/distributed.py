"""Benchmarks of the distributed service (`nablagfn bench sampler | learner | lora-sync`), as JSON dicts.

- `bench_sampler`: trajectories/s of a `SamplerActor` round (policy refresh, prompts, sampling,
  flow queries, record encoding, XADD) over a bare loop that makes the same UNet calls — the same
  input shapes, the same adapter state, in the same order, recorded by a forward hook on the
  actor's own UNet — with nothing else, each round followed by its replay (so a change of machine
  load hits both). efficiency = bare seconds / actor seconds (target ≥ 0.95).
- `bench_learner`: the learner's busy fraction with samplers not the bottleneck: the scored
  stream is filled beforehand (a sampler and a reward worker in process), then `updates` learner
  updates run; busy = seconds inside the model update / wall seconds of the loop (target ≥ 0.9),
  with the rest broken down (collect = XREADGROUP + decode + validation, publish, checkpoint).
- `bench_lora_sync`: LoRA publish → every sampler actor updated. Sampler actors run their loops as
  Ray actors (a drain consumer keeps their stream open); the bench publishes `publishes` versions
  `interval_s` apart, and each latency is the last sampler's load time minus the publish time (one
  machine, one clock). Samplers poll between rounds, so this is bounded by a round's duration;
  the pure fetch + verify + load time of one blob is reported beside it.
Each runs on an embedded Redis in a temporary folder unless given a URL.
"""
from __future__ import annotations

import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from nablagfn.common.config import TrainConfig


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
            "n": int(a.size)}


@contextmanager
def _redis(url: Optional[str]) -> Iterator[str]:
    from nablagfn.common.transport import start_embedded_redis

    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="nablagfn-bench-") as tmp:
        server = start_embedded_redis(Path(tmp) / "redis")
        try:
            yield server.url
        finally:
            server.stop()


def _cache_dir(cfg: TrainConfig) -> str:
    from nablagfn.common.models.loading import PRESETS, resolve_pretrained
    from nablagfn.learner.local_trainer import model_cache_dir

    cache = str(model_cache_dir(cfg))
    if cfg.model.pretrained in PRESETS:
        resolve_pretrained(cfg.model, cache)
    return cache


def _publish_initial(url: str, cfg: TrainConfig, state: dict) -> None:
    from nablagfn.common.transport import LoraRegistry, StreamClient
    from nablagfn.common.transport.keys import RunKeys

    with StreamClient.from_config(cfg.distributed.redis, url) as c:
        LoraRegistry(c.conn, prefix=RunKeys.from_config(cfg.distributed).lora_prefix).publish(state, version=0)


class UNetCallRecorder:
    """Forward pre-hook on a UNet: the (sample shape, timestep shape, encoder states shape,
    adapters on) of every call, for a replay with the same work."""

    def __init__(self, unet):
        from nablagfn.common.models.lora import adapters_enabled

        self.calls: list[tuple] = []
        self._enabled = lambda: adapters_enabled(unet)
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.calls.append((tuple(sample.shape), tuple(torch.as_tensor(t).shape),
                           None if ehs is None else tuple(ehs.shape), self._enabled()))

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def replay_unet_calls(unet, calls: list[tuple], device: torch.device, dtype: torch.dtype) -> float:
    """Seconds to make `calls` (UNetCallRecorder.calls) with random inputs, nothing else."""
    from nablagfn.common.models.lora import adapters_disabled

    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(s, generator=g).to(device, dtype), torch.randint(1, 999, t or (1,), generator=g).to(device),
               None if e is None else torch.randn(e, generator=g).to(device, dtype), on) for s, t, e, on in calls]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for x, t, e, on in inputs:
        ctx = adapters_disabled(unet) if not on else _null()
        with ctx:
            if e is None:
                unet(x, t, return_dict=False)
            else:
                unet(x, t, encoder_hidden_states=e, return_dict=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@contextmanager
def _null():
    yield


def bench_sampler(cfg: TrainConfig, rounds: int = 5, warmup: int = 1, url: Optional[str] = None) -> dict[str, Any]:
    """SamplerActor rounds vs a bare loop of the same UNet calls (see the module docstring)."""
    from nablagfn.actors.sampler_actor import SamplerActor
    from nablagfn.common.models import lora_state_dict

    n = cfg.distributed.sampler_batch
    cfg.distributed.redis.max_stream_depth = max(cfg.distributed.redis.max_stream_depth, (rounds + warmup) * n + 1)
    cache = _cache_dir(cfg)
    with _redis(url) as redis_url:
        actor = SamplerActor(cfg, 0, redis_url, "bench-sampler", cache)
        _publish_initial(redis_url, cfg, lora_state_dict(actor.policy.pipe.unet))
        actor.wait_for_policy(30)
        for _ in range(warmup):
            actor.step()
        actor_s = bare_s = 0.0
        calls = 0
        for _ in range(rounds):  # alternate, so that a change of machine load hits both sides
            rec = UNetCallRecorder(actor.policy.pipe.unet)
            _sync(actor.device)
            t0 = time.perf_counter()
            actor.step()
            _sync(actor.device)
            actor_s += time.perf_counter() - t0
            rec.remove()
            bare_s += replay_unet_calls(actor.policy.pipe.unet, rec.calls, actor.device, actor.policy.denoiser.dtype)
            calls += len(rec.calls)
        stats = actor.stats()
        actor.close()
    traj = rounds * n
    return {"bench": "sampler", "rounds": rounds, "trajectories": traj, "unet_calls": calls,
            "actor_seconds": actor_s, "bare_unet_seconds": bare_s,
            "actor_trajectories_per_s": traj / actor_s, "bare_trajectories_per_s": traj / bare_s,
            "efficiency": bare_s / actor_s, "target": 0.95,
            "record_bytes_mean": stats["bytes"] / max(1, stats["records"]),
            "device": str(actor.device), "num_steps": cfg.sampler.num_steps, "sampler_batch": n,
            "model": cfg.model.pretrained}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_learner(cfg: TrainConfig, updates: int = 3, warmup: int = 1, url: Optional[str] = None) -> dict[str, Any]:
    """Learner busy fraction on a pre-filled scored stream (see the module docstring)."""
    from nablagfn.actors.sampler_actor import SamplerActor
    from nablagfn.learner.learner_actor import LearnerActor
    from nablagfn.rewards_service.worker import RewardWorker

    dc = cfg.distributed
    need = (updates + warmup) * cfg.batch_trajectories
    dc.redis.max_stream_depth = max(dc.redis.max_stream_depth, need + 1)
    dc.max_policy_lag = updates + warmup + 1  # every pre-sampled record stays admissible
    cache = _cache_dir(cfg)
    with _redis(url) as redis_url, tempfile.TemporaryDirectory(prefix="nablagfn-bench-learner-") as run_dir:
        cfg.run_dir = run_dir
        learner = LearnerActor(cfg, redis_url, "bench-learner", cache)
        sampler = SamplerActor(cfg, 0, redis_url, "bench-learner", cache)
        worker = RewardWorker(cfg, 0, redis_url, cache)
        sampler.wait_for_policy(30)
        while sampler.counters["records"] < need:
            sampler.step()
            worker.step(block_ms=10)
        while worker.counters["scored"] < need:
            worker.step(block_ms=10)
        for _ in range(warmup):
            learner.update()
        before = dict(learner.counters)
        _sync(learner.model.device)
        t0 = time.perf_counter()
        for _ in range(updates):
            learner.update()
        _sync(learner.model.device)
        wall = time.perf_counter() - t0
        d = {k: learner.counters[k] - before[k] for k in ("seconds_learn", "seconds_wait", "seconds_publish",
                                                          "seconds_checkpoint")}
        for a in (learner, sampler, worker):
            a.close()
    return {"bench": "learner", "updates": updates, "batch_trajectories": cfg.batch_trajectories,
            "wall_seconds": wall, "busy_fraction": d["seconds_learn"] / wall, "target": 0.9,
            "seconds_model_update": d["seconds_learn"], "seconds_collect": d["seconds_wait"],
            "seconds_publish": d["seconds_publish"], "seconds_checkpoint": d["seconds_checkpoint"],
            "seconds_other": wall - sum(d.values()), "checkpoint_every": dc.checkpoint_every,
            "publish_every": dc.publish_every, "device": str(learner.model.device), "model": cfg.model.pretrained}


def bench_lora_sync(cfg: TrainConfig, publishes: int = 10, interval_s: float = 1.0,
                    url: Optional[str] = None) -> dict[str, Any]:
    """LoRA publish → all sampler actors updated, p50/p99 (see the module docstring)."""
    import ray

    from nablagfn.actors.sampler_actor import SamplerActor
    from nablagfn.common.models import add_lora, load_lora_state_dict, load_pipeline, lora_state_dict
    from nablagfn.common.transport import LoraRegistry, StreamClient, shapes_of
    from nablagfn.common.transport.keys import REWARD_GROUP, RunKeys
    from nablagfn.driver import local_resources, role_options

    dc = cfg.distributed
    cache = _cache_dir(cfg)
    pipe = load_pipeline(cfg.model, cache_dir=cache)
    add_lora(pipe.unet, cfg.lora)
    base = lora_state_dict(pipe.unet)
    keys = RunKeys.from_config(dc)
    started = False
    with _redis(url) as redis_url:
        client = StreamClient.from_config(dc.redis, redis_url)
        registry = LoraRegistry(client.conn, prefix=keys.lora_prefix, keep=dc.redis.lora_keep_versions,
                                max_bytes=dc.redis.max_lora_bytes)
        registry.publish(base, version=0)
        # the pure transport + load time of one version, in this process
        load_s = []
        for _ in range(5):
            t0 = time.perf_counter()
            _, state = registry.fetch_if_newer(-1, shapes_of(base))
            load_lora_state_dict(pipe.unet, state)
            load_s.append(time.perf_counter() - t0)
        stop = threading.Event()

        def drain() -> None:  # stands in for the reward workers: keeps the samplers' stream open
            with StreamClient.from_config(dc.redis, redis_url) as c:
                for s in keys.traj_streams:
                    c.ensure_group(s, REWARD_GROUP)
                while not stop.is_set():
                    got = c.read_many(keys.traj_streams, REWARD_GROUP, "drain", count=64, block_ms=100)
                    for s, i, _ in got:
                        c.ack(s, REWARD_GROUP, i)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        if not ray.is_initialized():
            need = local_resources(cfg)
            ray.init(address="local", num_cpus=need["num_cpus"], resources=need["resources"] or None,
                     include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            started = True
        actors = [ray.remote(SamplerActor).options(**role_options(dc.sampler)).remote(cfg, i, redis_url, "bench-sync", cache)
                  for i in range(dc.num_samplers)]
        try:
            ray.get([a.ready.remote() for a in actors], timeout=dc.startup_timeout_s)
            refs = [a.run.remote() for a in actors]
            time.sleep(interval_s)
            published: dict[int, float] = {}
            g = torch.Generator().manual_seed(0)
            for _ in range(publishes):
                state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
                t = time.time()
                v = registry.publish(state)
                published[v] = t
                time.sleep(interval_s)
            time.sleep(interval_s)
            client.conn.client.set(keys.stop_key, 1)
            stats = ray.get(refs, timeout=dc.startup_timeout_s)
        finally:
            stop.set()
            for a in actors:
                ray.kill(a)
            if started:
                ray.shutdown()
            client.close()
    latencies, missed = [], 0
    for v, t in published.items():
        loads = [dict(s["versions_loaded"]).get(v) for s in stats]
        if any(x is None for x in loads):  # a sampler skipped v (a newer one came first)
            missed += 1
            continue
        latencies.append(max(loads) - t)
    rounds = [s["seconds_sampling"] / max(1, s["rounds"]) for s in stats]
    return {"bench": "lora_sync", "samplers": dc.num_samplers, "publishes": publishes, "interval_s": interval_s,
            "publish_to_all_updated_s": _percentiles(latencies) if latencies else None,
            "versions_skipped_by_some_sampler": missed,
            "fetch_verify_load_s": _percentiles(load_s), "lora_bytes": sum(v.numel() * 4 for v in base.values()),
            "sampler_round_seconds_mean": float(np.mean(rounds)), "model": cfg.model.pretrained}
