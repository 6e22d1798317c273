"""`nablagfn bench metrics`: what the Prometheus hooks add to a sampler round and a learner update.

The hooks are timed directly (median of `repeats` calls, after warm-up) with realistic inputs:
- sampler: `sampler_round` + `lora_version` (one round);
- reward: `reward_batch` on `reward_batch` scored records with latent-sized gradients + `sync`;
- learner: `learner_update` with `loss_terms` logged terms, `batch` lags, and the XLEN of the two
  streams on a real (embedded) Redis, + `lora_version` with a publish time.
The fraction is hook time / step time, with step times read from a finished run
(`--run-dir`: metrics.jsonl `seconds_learn`, summary.json samplers' seconds_sampling / rounds) or
given (`--sampler-step-s`, `--learner-step-s`). Target: ≤ 0.02 for sampler and learner.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

TARGET = 0.02


def _median_s(fn: Callable[[], None], repeats: int) -> float:
    for _ in range(max(5, repeats // 10)):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def step_times_from_run(run_dir: str | Path) -> dict[str, float]:
    """Median learner compute per update and mean sampler round time of a finished distributed run."""
    run_dir = Path(run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl: no updates")
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = sum(s["rounds"] for s in summary["samplers"])
    if rounds == 0:
        raise ValueError(f"{run_dir}/summary.json: the samplers made no round")
    sampling = sum(s["seconds_sampling"] + s.get("seconds_publish", 0.0) for s in summary["samplers"])
    return {"learner_step_s": statistics.median(r["seconds_learn"] for r in rows),
            "sampler_step_s": sampling / rounds}


def measure(*, sampler_step_s: Optional[float], learner_step_s: Optional[float], batch: int = 64,
            loss_terms: int = 12, reward_batch: int = 4, latent_shape=(4, 64, 64), repeats: int = 2000) -> dict:
    from nablagfn.common.metrics import RoleMetrics
    from nablagfn.common.transport import StreamClient, start_embedded_redis
    from nablagfn.common.transport.keys import RunKeys
    from nablagfn.common.config import RedisConfig
    from nablagfn.common.transport import ScoredRecord

    out: dict = {"repeats": repeats, "target_fraction": TARGET}
    sampler = RoleMetrics("sampler", 0, node="bench")
    counters = {"records": 0, "lora_loads": 1, "seconds_paused": 0.0}

    def sampler_hooks():
        counters["records"] += 4
        sampler.sampler_round(4, 50, 1.0, counters)
        sampler.lora_version(3)
    out["sampler_hook_s"] = _median_s(sampler_hooks, repeats)

    reward = RoleMetrics("reward", 0, node="bench")
    recs = [ScoredRecord(meta={}, tensors={"grad_final": torch.randn(*latent_shape)}) for _ in range(reward_batch)]
    rcounters = {"scored": 0, "dead_lettered": 0, "reclaimed": 0, "non_finite": 0, "seconds_paused": 0.0}

    def reward_hooks():
        rcounters["scored"] += reward_batch
        reward.reward_batch(0.5, recs)
        reward.sync(rcounters)
    out["reward_hook_s"] = _median_s(reward_hooks, repeats)

    with tempfile.TemporaryDirectory() as tmp:
        server = start_embedded_redis(Path(tmp) / "redis")
        try:
            streams = StreamClient.from_config(RedisConfig(), server.url)
            keys = RunKeys()
            learner = RoleMetrics("learner", 0, node="bench")
            logs = {f"term_{i}": float(i) for i in range(loss_terms)}
            lags = [i % 2 for i in range(batch)]
            lcounters = {"trained": 0, "dropped_stale": 0, "duplicates": 0, "dead_lettered": 0,
                         "seconds_learn": 1.0, "seconds_wait": 0.1}
            m = {"seconds_learn": 1.0, "seconds_wait": 0.1, "reward_mean": 0.0, "reward_std": 1.0}

            def learner_hooks():
                lcounters["trained"] += batch
                learner.learner_update(m, logs, lags, batch * 10, lcounters, streams, keys)
                learner.lora_version(5, 0.01)
            out["learner_hook_s"] = _median_s(learner_hooks, max(200, repeats // 4))
            streams.close()
        finally:
            server.stop()
    for role, step in (("sampler", sampler_step_s), ("learner", learner_step_s)):
        out[f"{role}_step_s"] = step
        if step:
            frac = out[f"{role}_hook_s"] / step
            out[f"{role}_overhead_fraction"] = frac
            out[f"{role}_within_target"] = frac <= TARGET
    return out
