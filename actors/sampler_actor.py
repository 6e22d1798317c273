"""`SamplerActor`: holds the pretrained pipeline + LoRA policy and turns it into trajectory records.

Two parts: `SamplerLoop`, the transport side (policy versions from the LoRA registry, backpressure,
XADD, the stop key, counters — independent of the model), and a policy object that samples
(`DiffusionSamplerPolicy` here; the GMM testbed brings its own). `SamplerActor` is the two together.

One round (`step`), once the stream has room:
1. refresh the policy: if the LoRA registry has a version newer than the one loaded, fetch it
   (verified: keys and shapes of this policy's adapter, finite values) and load it;
2. draw `sampler_batch` prompts, sample their trajectories through the MDP with the policy
   (common/trajectories.py), choose the kept transitions (common/subsample.py);
3. compute what the learner needs at sampling time (common/policy.py `plan_flow_queries`: the
   flow-query states and the x̂₀ at each, μ# for pretrained-mean forward points);
4. encode one record per trajectory (trajectory_records.py) stamped with the policy version that
   sampled it, and XADD each, counted as produced in the run's accounting in the same server-side
   step (common/transport/accounting.py), so a sampler killed at any moment leaves the count
   exact. Backpressure: a round starts only while the trajectory stream is below its depth bound,
   and an XADD that finds it full waits (the bound is exact: the check and append are atomic).

`run` repeats rounds until the driver sets the run's stop key (or `max_rounds`). A plain class:
the driver wraps it with `ray.remote(...).options(resources)`; tests and benchmarks use it as is.
It never computes rewards or trains. Random draws: prompts from numpy's generator seeded with
(prompts.seed, seed, 1000 + index), noise and subsampling from torch generators seeded with
seed·1000 + index (+ a second stream), so samplers draw different trajectories.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Protocol

import numpy as np
import torch

from nablagfn.common.config import DistributedConfig, TrainConfig
from nablagfn.common.config_io import validate
from nablagfn.common.metrics import index_from_name, start_role_metrics
from nablagfn.common.transport import LoraRegistry, RecordError, StreamClient, TrajectoryRecord
from nablagfn.common.transport.accounting import Accounting
from nablagfn.common.transport.keys import RunKeys

from .trajectory_records import record_steps, trajectory_records

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)


def actor_device(device: str) -> torch.device:
    """cfg.device inside an actor: auto = the GPU Ray assigned it (if any), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def restarted_by_ray() -> bool:
    """True inside an actor that Ray restarted after a death (max_restarts)."""
    try:
        import ray

        return ray.is_initialized() and bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside an actor (tests, benchmarks): not restarted
        return False


class SamplerPolicy(Protocol):
    """What `SamplerLoop` needs from the thing that samples."""

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a published version must have (checked before loading)."""

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Load a published (verified) version."""

    def sample_records(self, n: int, meta: dict, actor: str) -> list[TrajectoryRecord]:
        """n trajectories with the loaded policy, as records carrying `meta` (run id, version...)."""


class SamplerLoop:
    """The transport side of a sampler (see the module docstring) around a `SamplerPolicy`."""

    def __init__(self, dcfg: DistributedConfig, policy: SamplerPolicy, *, name: str, redis_url: str,
                 run_id: str, sampler_kind: str, num_steps: int):
        self.dcfg, self.policy, self.name, self.run_id = dcfg, policy, name, run_id
        self.sampler_kind, self.num_steps = sampler_kind, int(num_steps)
        self.keys = RunKeys.from_config(dcfg)
        self.streams = StreamClient.from_config(dcfg.redis, redis_url)
        self.accounting = Accounting(self.streams, self.keys.accounting)
        self.registry = LoraRegistry(self.streams.conn, prefix=self.keys.lora_prefix,
                                     keep=dcfg.redis.lora_keep_versions, max_bytes=dcfg.redis.max_lora_bytes)
        self.expected = policy.expected_shapes()
        self.version: Optional[int] = None
        self.counters = {"rounds": 0, "records": 0, "bytes": 0, "lora_loads": 0,
                         "seconds_sampling": 0.0, "seconds_paused": 0.0, "seconds_waiting_policy": 0.0,
                         "seconds_publish": 0.0, "lora_rejected": 0}
        self.rejected_versions: set[int] = set()  # published versions that failed verification
        self.versions_loaded: list[tuple[int, float]] = []  # (version, wall time it was loaded)
        self.metrics = start_role_metrics(dcfg.metrics, "sampler", index_from_name(name), self.streams.conn, self.keys)

    # -- control ------------------------------------------------------------------------------
    def ready(self) -> str:
        return self.name

    def stop_requested(self) -> bool:
        return bool(self.streams.conn.call(self.streams.conn.client.exists, self.keys.stop_key))

    def refresh_policy(self) -> bool:
        """Load the newest published version if it is newer than ours; True if one was loaded.
        A version that fails verification (corrupt blob, wrong keys or shapes, NaN) is refused,
        counted (`lora_rejected`) and remembered, and the current weights stay: sampling goes on."""
        latest = self.registry.latest_version()
        if latest is not None and latest in self.rejected_versions:
            return False
        try:
            got = self.registry.fetch_if_newer(self.version, self.expected)
        except RecordError as exc:
            self.rejected_versions.add(latest)
            self.counters["lora_rejected"] += 1
            log.warning("%s: LoRA version %s refused, keeping version %s: %s", self.name, latest, self.version,
                        exc.reason)
            return False
        if got is None:
            return False
        version, state = got
        self.policy.load(state)
        self.version = version
        self.counters["lora_loads"] += 1
        self.versions_loaded.append((version, time.time()))
        self.metrics.lora_version(version)
        return True

    def wait_for_policy(self, timeout_s: float) -> bool:
        """Block until some version is loaded (the learner publishes version 0 at start); False on
        timeout or stop."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while not self.refresh_policy() and self.version is None:
            if time.monotonic() > deadline or self.stop_requested():
                break
            time.sleep(self.dcfg.poll_s)
        self.counters["seconds_waiting_policy"] += time.perf_counter() - t0
        return self.version is not None

    # -- one round ----------------------------------------------------------------------------
    def sample_records(self, n: Optional[int] = None) -> list[TrajectoryRecord]:
        """Sample n (default sampler_batch) trajectories with the current policy; their records."""
        if self.version is None:
            raise RuntimeError(f"{self.name}: no policy version loaded (nothing published yet)")
        t0 = time.perf_counter()
        meta = {"run_id": self.run_id, "policy_version": int(self.version), "sampler": self.sampler_kind,
                "num_steps": self.num_steps, "sampled_at": time.time()}
        records = self.policy.sample_records(n or self.dcfg.sampler_batch, meta, self.name)
        self.counters["seconds_sampling"] += time.perf_counter() - t0
        return records

    def wait_for_room(self) -> bool:
        """Pause while a trajectory stream is at its depth bound, before sampling: records sampled
        now and queued for long would only age (policy lag). False if stopped while waiting."""
        t0 = None
        while max(self.streams.depth(s) for s in self.keys.traj_streams) >= self.dcfg.redis.max_stream_depth:
            t0 = t0 or time.perf_counter()
            if self.stop_requested():
                return False
            time.sleep(self.dcfg.poll_s)
        if t0:
            self.counters["seconds_paused"] += time.perf_counter() - t0
        return True

    def publish(self, records: list[TrajectoryRecord]) -> bool:
        """XADD each record, waiting while its stream is full; False if stopped while waiting."""
        dc = self.dcfg
        t0 = time.perf_counter()
        for rec in records:
            msg = rec.to_msg(max_bytes=dc.redis.max_record_bytes)
            stream = self.keys.traj_stream_for(rec.traj_id)
            paused = None
            while not self.accounting.add(stream, msg, max_depth=dc.redis.max_stream_depth):
                paused = paused or time.perf_counter()
                if self.stop_requested():
                    self.counters["seconds_paused"] += time.perf_counter() - paused
                    return False
                time.sleep(dc.poll_s)
            if paused:
                self.counters["seconds_paused"] += time.perf_counter() - paused
            self.counters["records"] += 1
            self.counters["bytes"] += len(msg)
        self.counters["seconds_publish"] += time.perf_counter() - t0
        return True

    def step(self) -> int:
        """One round: wait for room in the stream, refresh the policy, sample, publish; returns
        the records written."""
        if not self.wait_for_room():
            return 0
        t0 = time.perf_counter()
        self.refresh_policy()
        records = self.sample_records()
        if not self.publish(records):
            return 0
        self.counters["rounds"] += 1
        self.metrics.sampler_round(len(records), self.num_steps, time.perf_counter() - t0, self.counters)
        return len(records)

    def run(self, max_rounds: Optional[int] = None) -> dict[str, Any]:
        """Rounds until the stop key is set (or max_rounds); returns `stats()`."""
        if not self.wait_for_policy(self.dcfg.startup_timeout_s):
            if self.stop_requested():
                return self.stats()
            raise RuntimeError(f"{self.name}: no policy version was published within "
                               f"{self.dcfg.startup_timeout_s} s")
        done = 0
        while (max_rounds is None or done < max_rounds) and not self.stop_requested():
            self.step()
            done += 1
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {"actor": self.name, "version": self.version, **self.counters,
                "versions_loaded": list(self.versions_loaded)}

    def close(self) -> None:
        self.metrics.close()
        self.streams.close()


class DiffusionSamplerPolicy:
    """The pretrained pipeline with the LoRA policy, sampling records (a `SamplerPolicy`)."""

    def __init__(self, cfg: TrainConfig, index: int, cache_dir: Optional[str] = None):
        from nablagfn.common.models import Denoiser, add_lora, load_pipeline
        from nablagfn.common.policy import PolicyCallables
        from nablagfn.common.prompts import build_prompt_source
        from nablagfn.common.schedule import make_schedule
        from nablagfn.common.trajectories import pipeline_latent_shape

        self.cfg, self.index = cfg, int(index)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = actor_device(cfg.device)
        self.pipe = load_pipeline(cfg.model, cache_dir=cache_dir, device=self.device)
        add_lora(self.pipe.unet, cfg.lora)
        self.denoiser = Denoiser.from_pipeline(self.pipe)
        sc = cfg.sampler
        self.schedule = make_schedule(dict(self.pipe.scheduler.config), sc.num_steps, sc.kind)
        self.latent_shape = pipeline_latent_shape(self.pipe, self.denoiser, cfg.model.resolution)
        self.uncond = self.denoiser.encode_prompts([""])
        self.models = PolicyCallables(self.denoiser, None, self.schedule, self.uncond, sc.guidance_scale, self.device)
        self.prompts = build_prompt_source(cfg.prompts)
        self.prompt_rng = np.random.default_rng((cfg.prompts.seed, cfg.seed, 1000 + index))
        self.sample_gen = torch.Generator().manual_seed(cfg.seed * 1000 + index)
        self.subsample_gen = torch.Generator().manual_seed(cfg.seed * 1000 + index + 500)
        self.latent_dtype = _DTYPES[cfg.distributed.latent_dtype]

    def reseed(self, salt: int) -> None:
        """New prompt/noise/subsampling streams (a restarted actor), still derived from the seeds."""
        cfg, i = self.cfg, self.index
        self.prompt_rng = np.random.default_rng((cfg.prompts.seed, cfg.seed, 1000 + i, salt))
        self.sample_gen = torch.Generator().manual_seed(hash((cfg.seed, i, salt)) & 0x7FFFFFFF)
        self.subsample_gen = torch.Generator().manual_seed(hash((cfg.seed, i, salt, 500)) & 0x7FFFFFFF)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        from nablagfn.common.models import lora_state_dict
        from nablagfn.common.transport import shapes_of

        return shapes_of(lora_state_dict(self.pipe.unet))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        from nablagfn.common.models import load_lora_state_dict

        load_lora_state_dict(self.pipe.unet, state)

    def sample_records(self, n: int, meta: dict, actor: str) -> list[TrajectoryRecord]:
        from nablagfn.common.policy import plan_flow_queries
        from nablagfn.common.trajectories import sample_training_batch

        cfg, sc = self.cfg, self.cfg.sampler
        ids, prompts = self.prompts.sample(n, rng=self.prompt_rng)
        cond = self.denoiser.encode_prompts(prompts)
        traj, keep = sample_training_batch(self.denoiser, self.schedule, cond, self.uncond, sc, cfg.subsample,
                                           self.sample_gen, self.subsample_gen, self.latent_shape, self.device)
        queries, fwd_point = plan_flow_queries(self.models, traj, keep, cond, cfg)
        states_needed, eps_needed = record_steps(keep, sc.num_steps, cfg)
        return trajectory_records(traj, keep, cond, ids.tolist(), prompts, queries, fwd_point, states_needed,
                                  timesteps=self.schedule.timesteps, meta=meta, actor=actor,
                                  latent_dtype=self.latent_dtype, eps_steps=eps_needed)


class SamplerActor(SamplerLoop):
    """A sampler of a distributed diffusion run: `SamplerLoop` around `DiffusionSamplerPolicy`."""

    def __init__(self, cfg: TrainConfig, index: int, redis_url: str, run_id: str,
                 cache_dir: Optional[str] = None):
        validate(cfg)
        self.cfg, self.index = cfg, int(index)
        policy = DiffusionSamplerPolicy(cfg, self.index, cache_dir)
        if restarted_by_ray():  # fresh noise: the seeded streams would repeat the dead incarnation's draws
            policy.reseed(int.from_bytes(os.urandom(4), "little"))
        super().__init__(cfg.distributed, policy, name=f"sampler-{self.index}", redis_url=redis_url,
                         run_id=run_id, sampler_kind=cfg.sampler.kind, num_steps=cfg.sampler.num_steps)

    @property
    def device(self) -> torch.device:
        return self.policy.device
