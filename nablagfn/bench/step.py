"""`nablagfn bench step`: the wall time and peak memory of one training update, per phase.

Phases are those of `LocalTrainer.update` (ALGORITHM.md §3): sampling (trajectories, the x̂₀ of the
flow queries), reward (log R and ∇ log R through the VAE) and learner (chain rule, Stein targets,
loss, optimizer step). Peak memory per phase: `torch.cuda.max_memory_allocated` (reset at each
phase start) on CUDA; on CPU the peak resident set size sampled every 2 ms by a thread reading
/proc/self/statm (torch's CPU allocations are invisible to tracemalloc), with the process-lifetime
peak `ru_maxrss` beside it.
"""
from __future__ import annotations

import contextlib
import os
import resource
import threading
import time

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.subsample import num_kept

MB = 1024 * 1024


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RSSPeak:
    """Max RSS seen while the block runs (a polling thread)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


class MeasuredPhases:
    """Wraps a trainer's PhaseTimer: each phase also records its peak memory."""

    def __init__(self, timer, device: torch.device):
        self.timer, self.device = timer, device
        self.peak_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            with self.timer(name):
                yield
            self.peak_mb[name] = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            with _RSSPeak() as meter, self.timer(name):
                yield
            self.peak_mb[name] = meter.peak / MB

    def reset(self) -> None:
        self.timer.reset()
        self.peak_mb = {}

    @property
    def seconds(self) -> dict[str, float]:
        return self.timer.seconds


def bench_step(cfg: TrainConfig, warmup: int = 1) -> dict:
    """Build the local trainer of `cfg`, run `warmup` updates, then measure one update."""
    from nablagfn.learner.local_trainer import LocalTrainer

    t0 = time.perf_counter()
    trainer = LocalTrainer(cfg)
    setup_s = time.perf_counter() - t0
    meter = MeasuredPhases(trainer.timer, trainer.device)
    trainer.timer = meter
    for _ in range(warmup):
        trainer.update()
    meter.reset()
    if trainer.device.type == "cuda":
        before_mb = torch.cuda.memory_allocated(trainer.device) / MB
    else:
        before_mb = _rss_bytes() / MB
    logs = trainer.update()
    seconds = dict(meter.seconds)
    out = {
        "device": str(trainer.device),
        "torch_threads": torch.get_num_threads(),
        "model": cfg.model.pretrained,
        "reward": cfg.reward.name,
        "batch_trajectories": cfg.batch_trajectories,
        "num_steps": cfg.sampler.num_steps,
        "kept_per_trajectory": num_kept(cfg.sampler.num_steps, cfg.subsample.timestep_fraction,
                                        cfg.subsample.keep_last),
        "backward_estimator": cfg.objective.backward_estimator,
        "warmup_updates": warmup,
        "setup_seconds": round(setup_s, 3),
        "wall_seconds": {**{k: round(v, 4) for k, v in seconds.items()}, "total": round(sum(seconds.values()), 4)},
        "memory_before_update_mb": round(before_mb, 1),  # models, optimizer state, caches
        "peak_memory_mb": {k: round(v, 1) for k, v in meter.peak_mb.items()},
        "memory_kind": "cuda_max_memory_allocated" if trainer.device.type == "cuda" else "process_rss",
        "loss": logs.get("loss"),
        "reward_mean": logs.get("reward_mean"),
    }
    if trainer.device.type != "cuda":
        out["peak_memory_mb"]["process_lifetime_max_rss"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out
