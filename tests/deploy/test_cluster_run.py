"""deploy/run-config.yaml on a real (one-machine) Ray cluster started with `ray start --head`, its
node advertising the custom resources deploy/ray-cluster.yaml gives each role's node type
(`sampler`, `reward`, `learner`): `nablagfn train --ray-address HOST:PORT --config deploy/run-config.yaml`
joins it (not a runtime of its own), every actor is placed by its role's resource, and the run
trains. GPUs and CPU counts are scaled down to this machine by overrides; nothing else of the file is."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_driver import SMALL  # noqa: E402  (tests/ on sys.path: rootdir-less test modules)

# the role resources of deploy/run-config.yaml: one unit per actor (2 samplers, 1 reward worker, the learner)
NODE_RESOURCES = {"sampler": 2, "reward": 1, "learner": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group (stopped with it, leaving other Ray
    runtimes of the test session alone) and its own temp dir (short: Ray's socket paths live there),
    so it records no cluster address in /tmp/ray for later `ray.init()` calls to find."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=2",
         f"--resources={json.dumps(NODE_RESOURCES)}", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # the GCS answers on its port once the head is up
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_config_places_each_role_on_its_resource_of_an_external_cluster(ray_head, tiny_dir, tmp_path):
    before = Path("/tmp/ray/ray_current_cluster").read_text() if Path("/tmp/ray/ray_current_cluster").exists() else None
    run = tmp_path / "run"
    scaled = ["distributed.num_samplers=2", "distributed.num_reward_workers=1",
              "distributed.sampler.num_gpus=0", "distributed.reward.num_gpus=0", "distributed.learner.num_gpus=0",
              "distributed.metrics.bind_address=127.0.0.1"]
    small = [o for o in SMALL if not o.startswith("distributed.") or "num_cpus" not in o]
    cpus = ["distributed.sampler.num_cpus=0.25", "distributed.reward.num_cpus=0.25",
            "distributed.learner.num_cpus=0.25"]
    proc = subprocess.run(
        [sys.executable, "-m", "nablagfn", "train", "--ray-address", ray_head, "--preset", "tiny",
         "--config", str(ROOT / "deploy" / "run-config.yaml"), "--updates", "2", "--run-dir", str(run),
         "--no-progress", f"model.pretrained={tiny_dir}", *small, *scaled, *cpus],
        # the head uses Ray's default token authentication; a driver joining by explicit address must
        # ask for it (Ray enables it by itself only for address=auto): RAY_AUTH_MODE=token, token file
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ray"] == ray_head  # joined the cluster, did not start its own runtime
    assert summary["updates"] == 2 and summary["accounting"]["unaccounted"] == 0
    assert len(summary["samplers"]) == 2 and len(summary["reward_workers"]) == 1
    import yaml

    used = yaml.safe_load((run / "config.yaml").read_text())["distributed"]
    assert {r: used[r]["resources"] for r in ("sampler", "reward", "learner")} == {
        "sampler": {"sampler": 1}, "reward": {"reward": 1}, "learner": {"learner": 1}}
    # the head recorded its address in its own temp dir, not where a plain `ray.init()` looks
    after = Path("/tmp/ray/ray_current_cluster").read_text() if Path("/tmp/ray/ray_current_cluster").exists() else None
    assert after == before
