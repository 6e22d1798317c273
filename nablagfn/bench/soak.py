"""`nablagfn bench soak`: the distributed run under repeated actor kills, with exact accounting.

Runs the distributed service (`train_distributed`, the given preset; tiny by default) for
`minutes`, and every `kill_every_s` seconds kills one random sampler and one random reward worker
(Ray restarts them: `ray.kill(..., no_restart=False)`; the driver resubmits their loops). Then it
stops the run cleanly and reports, from the run's summary (its accounting block comes from counters
kept in Redis atomically with every add / ack / dead letter, common/transport/accounting.py):

  produced, trained, dropped_stale, dead_lettered, duplicates, in_streams, unaccounted (must be 0),
  trained_twice (trajectories in trained.jsonl more than once; must be 0), restarts, kills,
  updates, wall_s.

Every actor may restart as often as the soak kills it (max_actor_restarts is raised to cover it).
"""
from __future__ import annotations

import copy
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from nablagfn.common.config import TrainConfig

SOAK_UPDATES = 10**9  # the run is stopped by time, not by its update count


def run_soak(cfg: TrainConfig, minutes: float, kill_every_s: float, *, seed: int = 0,
             run_dir: Optional[str] = None) -> dict:
    """The soak (see the module docstring); returns its JSON-ready result."""
    import ray

    from nablagfn.common.transport.keys import actor_name
    from nablagfn.driver import DriverError, run_id_for, start_ray, train_distributed

    if minutes <= 0 or kill_every_s <= 0:
        raise ValueError(f"--minutes and --kill-every must be > 0, got {minutes} and {kill_every_s}")
    cfg = copy.deepcopy(cfg)
    cfg.updates = SOAK_UPDATES
    cfg.progress = False
    kills_each = int(minutes * 60 / kill_every_s) + 1
    cfg.distributed.max_actor_restarts = max(cfg.distributed.max_actor_restarts, kills_each)
    tmp = None
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nablagfn-soak-")
        run_dir = tmp.name
    cfg.run_dir = str(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run_id = run_id_for(Path(run_dir))
    started = start_ray(cfg, cfg.distributed.ray_address)
    rng = random.Random(seed)
    stop = threading.Event()
    out: dict = {}

    def target():
        try:
            out["summary"] = train_distributed(cfg, stop=stop, print_table=False)
        except BaseException as exc:  # noqa: BLE001 - reported in the caller's thread
            out["error"] = exc

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    kills: list[dict] = []
    try:
        first = Path(run_dir) / "metrics.jsonl"  # kill only once the service runs (actors ready)
        while thread.is_alive() and not (first.is_file() and first.stat().st_size > 0):
            time.sleep(0.2)
        t_run = time.perf_counter()
        deadline = t_run + minutes * 60
        next_kill = t_run + kill_every_s
        while thread.is_alive() and time.perf_counter() < deadline:
            time.sleep(max(0.0, min(next_kill, deadline) - time.perf_counter()))
            if time.perf_counter() >= next_kill and thread.is_alive():
                for role, n in (("sampler", cfg.distributed.num_samplers), ("reward", cfg.distributed.num_reward_workers)):
                    name = actor_name(run_id, role, rng.randrange(n))
                    try:
                        ray.kill(ray.get_actor(name), no_restart=False)
                        kills.append({"t": round(time.perf_counter() - t_run, 2), "actor": name})
                    except ValueError:  # restarting right now and not yet registered: skip this one
                        kills.append({"t": round(time.perf_counter() - t_run, 2), "actor": name, "skipped": True})
                next_kill += kill_every_s
        stop.set()
        thread.join()
    finally:
        stop.set()
        thread.join(timeout=600)
        if started:
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    if "error" in out:
        raise DriverError(f"the soak run failed: {out['error']}") from out["error"]
    s = out["summary"]
    a = s["accounting"]
    return {"produced": a["produced"], "trained": a["trained"], "dropped_stale": a["dropped_stale"],
            "dead_lettered": a["dead_lettered"], "in_streams": a["in_streams"], "duplicates": a["duplicates"],
            "unaccounted": a["unaccounted"], "trained_twice": a["trained_lines"] - a["trained"],
            "restarts": s["restarts"], "kills": len([k for k in kills if not k.get("skipped")]),
            "kills_skipped": len([k for k in kills if k.get("skipped")]), "updates": s["updates"],
            "restart_seconds": s["restart_seconds"], "wall_s": round(time.perf_counter() - t0, 1),
            "minutes": minutes, "kill_every_s": kill_every_s}
