"""The distributed run survives faults, end to end on a real local Ray runtime, a real embedded Redis
and the tiny SD pipeline (the SMALL settings of test_driver.py): a killed sampler, reward worker or
learner is restarted by Ray and the driver resubmits its loop; the learner resumes from its
checkpoint (version counter, optimizer state); a Redis restart on the same directory is ridden out
by the clients' retries; a run stopped by SIGTERM resumes with `train --resume`. Every run ends
with the accounting block exact: produced = trained + dropped + dead-lettered + duplicates + still
queued (unaccounted == 0), and no trajectory trained twice.

In-process runs share one module-scoped Ray runtime (the driver's start_ray leaves it alone) and
run `train_distributed` in a background thread while the test kills actors by name."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.transport import StreamClient, TrajectoryRecord, start_embedded_redis
from nablagfn.common.transport.keys import REWARD_GROUP, RunKeys, actor_name

# as tests/test_driver.py SMALL (2 logical CPUs in all), plus a short reclaim idle time
SMALL = ["sampler.num_steps=4", "batch_trajectories=2", "train_batch_trajectories=0", "chunk_trajectories=4",
         "flow_net.block_out_channels=[32]", "subsample.timestep_fraction=0.5", "objective.reward_scale=1e4",
         "threads=1", "eval_trajectories=4", "grid_size=2",
         "distributed.sampler_batch=1", "distributed.max_policy_lag=1", "distributed.redis.max_stream_depth=3",
         "distributed.block_ms=50", "distributed.poll_s=0.02", "distributed.startup_timeout_s=240",
         "distributed.stall_timeout_s=240", "distributed.reclaim_idle_ms=3000",
         "distributed.sampler.num_cpus=0.5", "distributed.reward.num_cpus=0.5", "distributed.learner.num_cpus=0.5"]
RUN_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             object_store_memory=256 * 1024 * 1024)
    yield ray
    ray.shutdown()


def _cfg(tiny_dir, run_dir: Path, updates: int, *extra) -> TrainConfig:
    return build_config(TrainConfig, load_preset("tiny"),
                        {"updates": updates, "run_dir": str(run_dir), "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", *SMALL, *extra])


class BackgroundRun:
    """train_distributed in a thread; the run id is fixed up front so actors can be found by name."""

    def __init__(self, cfg: TrainConfig, run_id: str, redis_url: str | None = None):
        from nablagfn.driver import train_distributed

        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run_id").write_text(run_id + "\n")
        self.run_id = run_id
        self.summary, self.error = None, None

        def target():
            try:
                self.summary = train_distributed(cfg, redis_url=redis_url, print_table=False)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def updates_written(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    def wait_updates(self, n: int, timeout_s: float = RUN_TIMEOUT_S) -> None:
        _wait(lambda: self.updates_written() >= n or not self.thread.is_alive(), timeout_s, f"{n} updates")
        self.check()

    def finish(self, timeout_s: float = RUN_TIMEOUT_S) -> dict:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the run did not finish"
        self.check()
        return self.summary

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def kill(self, role: str, index: int = 0) -> None:
        import ray

        ray.kill(ray.get_actor(actor_name(self.run_id, role, index)), no_restart=False)


def _wait(cond, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def _rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x.strip()]


def _check_exactly_once(run_dir: Path, summary: dict, updates: int) -> list[dict]:
    """metrics.jsonl has updates 1..N once each with increasing versions; no trajectory trained twice;
    the accounting block is exact."""
    metrics = _rows(run_dir, "metrics.jsonl")
    assert [m["update"] for m in metrics] == list(range(1, updates + 1))
    versions = [m["version"] for m in metrics]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)  # the counter continues
    trained = [t["traj_id"] for t in _rows(run_dir, "trained.jsonl")]
    assert len(trained) == len(set(trained)) == 2 * updates  # batch_trajectories = 2, each once
    acct = summary["accounting"]
    assert acct["unaccounted"] == 0, acct
    assert acct["trained"] == acct["trained_acked"] == len(trained), acct
    assert acct["produced"] >= acct["trained"] > 0
    return metrics


@pytest.mark.usefixtures("ray_runtime")
def test_killed_sampler_is_restarted_and_run_continues(tiny_dir, tmp_path):
    run = BackgroundRun(_cfg(tiny_dir, tmp_path / "run", 4), "faults-sampler")
    run.wait_updates(1)
    run.kill("sampler", 0)
    summary = run.finish()
    assert summary["restarts"] == {"learner": 0, "reward": 0, "sampler": 1}
    assert summary["restarts_by_actor"] == {actor_name("faults-sampler", "sampler", 0): 1}
    assert summary["updates"] == 4 and not summary["stopped"]
    _check_exactly_once(run.run_dir, summary, 4)
    # the restarted sampler loaded a policy again and produced records (its counters are its own)
    s0 = next(s for s in summary["samplers"] if s["actor"] == "sampler-0")
    assert s0["lora_loads"] >= 1


@pytest.mark.usefixtures("ray_runtime")
def test_exhausted_restarts_fail_the_run_naming_the_actor(tiny_dir, tmp_path):
    from nablagfn.driver import DriverError

    run = BackgroundRun(_cfg(tiny_dir, tmp_path / "run", 50, "distributed.max_actor_restarts=0"), "faults-exhausted")
    run.wait_updates(1)
    run.kill("sampler", 1)
    run.thread.join(RUN_TIMEOUT_S)
    assert isinstance(run.error, DriverError), run.error
    assert "actor faults-exhausted:sampler:1 died" in str(run.error)
    assert "max_actor_restarts" in str(run.error)


@pytest.mark.usefixtures("ray_runtime")
def test_killed_reward_worker_records_reclaimed_trained_exactly_once(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path / "run", 4)
    server = start_embedded_redis(tmp_path / "redis")
    streams = StreamClient.from_url(server.url)
    try:
        run = BackgroundRun(cfg, "faults-reward", redis_url=server.url)
        run.wait_updates(1)
        traj = RunKeys.from_config(cfg.distributed).traj_streams[0]
        conn = streams.conn.client

        def held() -> list[str]:  # entries pending on the worker's consumer name
            rows = conn.xpending_range(traj, REWARD_GROUP, "-", "+", 100, consumername="reward-0")
            return [r["message_id"].decode() for r in rows]

        _wait(lambda: bool(held()), 60, "the reward worker to hold pending entries", every_s=0.005)
        run.kill("reward", 0)
        time.sleep(0.3)
        left = held()  # what the dead incarnation read and never acked
        left_ids = [TrajectoryRecord.from_msg(f[b"d"]).traj_id for i in left for _, f in conn.xrange(traj, i, i)]
        summary = run.finish()
    finally:
        streams.close()
        server.stop()
    assert left and len(left_ids) == len(left), "the kill left no pending entry to reclaim"
    assert summary["restarts"]["reward"] == 1 and summary["restarts"]["learner"] == 0
    # the restarted worker (same consumer name) took its dead incarnation's entries back at once
    (worker,) = summary["reward_workers"]
    assert worker["reclaimed"] >= len(left)
    _check_exactly_once(run.run_dir, summary, 4)
    trained = [t["traj_id"] for t in _rows(run.run_dir, "trained.jsonl")]
    assert all(trained.count(t) <= 1 for t in left_ids)


@pytest.mark.usefixtures("ray_runtime")
def test_killed_learner_resumes_from_checkpoint(tiny_dir, tmp_path):
    updates = 5
    run = BackgroundRun(_cfg(tiny_dir, tmp_path / "run", updates), "faults-learner")
    run.wait_updates(2)
    run.kill("learner", 0)
    summary = run.finish()
    assert summary["restarts"] == {"learner": 1, "reward": 0, "sampler": 0}
    metrics = _check_exactly_once(run.run_dir, summary, updates)
    restored = summary["learner"]["restored"]
    u = restored["update"]
    assert 1 <= u <= updates and summary["learner"]["resumed"]
    # the version counter continues: the restored learner publishes after its checkpoint's version
    assert restored["version"] == metrics[u - 1]["version"]
    if u < updates:
        assert metrics[u]["version"] > restored["version"]
    # the optimizer state in memory after the restart is the checkpoint's
    ck, live = restored["checkpoint_optimizer"], restored["live_optimizer"]
    assert ck["params"] == live["params"] > 0 and ck["steps"] == live["steps"]
    assert max(ck["steps"]) == restored["optimizer_steps"] > 0
    for k, v in ck["sums"].items():  # the same tensors, summed in float64: equal up to rounding
        assert abs(live["sums"][k] - v) <= 1e-9 * max(1.0, abs(v)), k
    # and it was continued, not reset: AdamW's step count at the end is the run's optimizer steps
    opt = torch.load(run.run_dir / "checkpoint" / "optimizer.pt", weights_only=True)
    assert max(int(s["step"]) for s in opt["state"].values()) == summary["optimizer_steps"]
    assert summary["optimizer_steps"] == json.loads((run.run_dir / "checkpoint" / "state.json").read_text())["optimizer_steps"]


@pytest.mark.usefixtures("ray_runtime")
def test_redis_restart_mid_run_run_continues(tiny_dir, tmp_path):
    from nablagfn.common.transport import LoraRegistry

    updates = 4
    cfg = _cfg(tiny_dir, tmp_path / "run", updates)
    assert cfg.distributed.redis.retry_window_s >= 5  # the default window covers a restart of seconds
    server = start_embedded_redis(tmp_path / "redis")
    url = server.url
    try:
        run = BackgroundRun(cfg, "faults-redis", redis_url=url)
        run.wait_updates(1)
        server.stop()
        time.sleep(1.0)  # down for a second, then the same directory (AOF) and socket
        server = start_embedded_redis(tmp_path / "redis")
        assert server.url == url
        summary = run.finish()
        keys = RunKeys.from_config(cfg.distributed)
        with StreamClient.from_url(url) as streams:
            latest = LoraRegistry(streams.conn, prefix=keys.lora_prefix).latest_version()
    finally:
        server.stop()
    assert summary["updates"] == updates and sum(summary["restarts"].values()) == 0
    _check_exactly_once(run.run_dir, summary, updates)
    assert latest == summary["learner"]["version"]  # the LoRA registry survived the restart


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nablagfn", "train", "--no-progress", *args]


def test_resume_continues_a_stopped_run(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as fh:  # a file, not a pipe: nobody reads a pipe while the run goes on
        first = subprocess.Popen(_train_cmd("--preset", "tiny", "--updates", "20", "--run-dir", str(run_dir),
                                            f"model.pretrained={tiny_dir}", *SMALL),
                                 env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1
              or first.poll() is not None, RUN_TIMEOUT_S, "a first update")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
    err = log.read_text()
    assert first.returncode == 143, err[-3000:]  # stopped cleanly, resumable
    assert "--resume" in err
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["stopped"] and stopped["accounting"]["unaccounted"] == 0
    done = stopped["updates"]
    assert 1 <= done < 20 and (run_dir / "checkpoint" / "state.json").is_file()

    total = done + 2
    second = subprocess.run(_train_cmd("--resume", str(run_dir), "--updates", str(total)), env=env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] and not summary["stopped"] and summary["updates"] == total
    assert summary["run_id"] == stopped["run_id"]
    _check_exactly_once(run_dir, summary, total)


def test_resume_errors_name_the_problem(tmp_path, capsys):
    from nablagfn.cli import main

    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    (tmp_path / "r" / "config.yaml").write_text("updates: 2\n")
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    (tmp_path / "r" / "checkpoint").mkdir()
    (tmp_path / "r" / "checkpoint" / "state.json").write_text("{}")
    assert main(["train", "--resume", str(tmp_path / "r"), "lora.rank=8"]) == 2
    assert "lora.rank=8 cannot change on a resumed run" in capsys.readouterr().err
    # the password of the run's Redis is not in config.yaml (written redacted): it must be given again
    (tmp_path / "r" / "config.yaml").write_text("updates: 2\ndistributed:\n  redis:\n"
                                                "    url: redis://user:***@localhost:6399/0\n")
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "password is not stored in config.yaml" in err and "--redis-url" in err


def test_soak_bench_accounts_for_every_record(tiny_dir, tmp_path):
    """`nablagfn bench soak` for ~40 s with a sampler and a reward worker killed every 15 s."""
    proc = subprocess.run([sys.executable, "-m", "nablagfn", "bench", "soak", "--minutes", "0.67",
                           "--kill-every", "15", "--run-dir", str(tmp_path / "soak"),
                           f"model.pretrained={tiny_dir}", *SMALL],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["unaccounted"] == 0 and result["trained_twice"] == 0, result
    assert result["kills"] >= 2 and result["updates"] >= 1 and result["trained"] > 0
    assert result["restarts"]["sampler"] + result["restarts"]["reward"] >= 1
    assert result["produced"] == (result["trained"] + result["dropped_stale"] + result["dead_lettered"]
                                  + result["duplicates"] + result["in_streams"])
