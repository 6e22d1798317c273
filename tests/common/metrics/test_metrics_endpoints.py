"""Every role of a short distributed run serves Prometheus metrics: the driver's
file-service-discovery list names one endpoint per actor (2 samplers, a reward worker, the
learner); each is scraped over HTTP while the run goes on, parsed with prometheus_client's text
parser, shows the metrics its role exports, and its counters increase between scrapes. After the
run the list is empty (no endpoint is live). The run is the tiny one of tests/test_driver.py, as a
real `python -m nablagfn train` subprocess."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nablagfn.common.metrics import TARGETS_FILE
from nablagfn.common.models import build_tiny_sd_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from test_driver import SMALL  # noqa: E402  (the tiny distributed run's settings)

UPDATES = 6
# the counter that must move on each role, and the series each role must show
MOVING = {"sampler": "nablagfn_trajectories_total", "reward": "nablagfn_trajectories_total",
          "learner": "nablagfn_learner_updates_total"}
COMMON = {"nablagfn_trajectories_total", "nablagfn_samples_total", "nablagfn_process_resident_memory_bytes"}
EXPECTED = {
    "sampler": COMMON | {"nablagfn_lora_version", "nablagfn_lora_loads_total", "nablagfn_sampler_round_seconds_count",
                         "nablagfn_paused_seconds_total"},
    "reward": COMMON | {"nablagfn_reward_latency_seconds_count", "nablagfn_reward_grad_norm",
                        "nablagfn_dead_lettered_total", "nablagfn_reclaimed_total", "nablagfn_non_finite_rewards_total"},
    "learner": COMMON | {"nablagfn_learner_step_seconds_count", "nablagfn_learner_busy_fraction",
                         "nablagfn_policy_lag_bucket", "nablagfn_loss", "nablagfn_reward_mean", "nablagfn_reward_std",
                         "nablagfn_lora_version", "nablagfn_lora_publish_seconds_count", "nablagfn_dropped_total",
                         "nablagfn_dead_lettered_total", "nablagfn_stream_depth"},
}


def scrape(url: str) -> dict[str, list]:
    """series name -> [(labels, value)] of one scrape."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(series: dict, name: str) -> float:
    return sum(v for _, v in series.get(name, []))


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    tiny = build_tiny_sd_pipeline(tmp_path_factory.mktemp("metrics_models") / "tiny-sd", seed=0)
    run_dir = tmp_path_factory.mktemp("metrics_run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nablagfn", "train", "--preset", "tiny", "--updates", str(UPDATES), "--run-dir",
                             str(run_dir), "--no-progress", f"model.pretrained={tiny}", *SMALL,
                             "distributed.metrics.port_range=[9400,9599]"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    path = run_dir / TARGETS_FILE
    first: dict[str, dict] = {}
    last: dict[str, dict] = {}
    groups: list = []
    deadline = time.monotonic() + 420
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if path.is_file():
                listed = json.loads(path.read_text())
                if len(listed) == 4:
                    groups = listed
            for g in groups:
                url = f"http://{g['targets'][0]}{g['labels']['__metrics_path__']}"
                try:
                    got = scrape(url)
                except OSError:
                    continue  # the run is ending and its actors are gone
                key = f"{g['labels']['role']}-{g['labels']['index']}"
                first.setdefault(key, got)
                last[key] = got
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    png = run_dir / "curves.png"  # reward / loss / lag curves for a person
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    return {"groups": groups, "first": first, "last": last, "final": json.loads(path.read_text())}


def test_discovery_file_lists_every_actor(scraped):
    labels = sorted((g["labels"]["role"], g["labels"]["index"]) for g in scraped["groups"])
    assert labels == [("learner", "0"), ("reward", "0"), ("sampler", "0"), ("sampler", "1")]
    for g in scraped["groups"]:
        assert len(g["targets"]) == 1 and ":" in g["targets"][0] and g["labels"]["node"]
    assert scraped["final"] == []  # after the run, nothing is live


def test_each_endpoint_exports_its_metrics_and_they_move(scraped):
    assert sorted(scraped["last"]) == ["learner-0", "reward-0", "sampler-0", "sampler-1"]
    for key, series in scraped["last"].items():
        role = key.split("-")[0]
        missing = EXPECTED[role] - set(series)
        assert not missing, (key, missing)
        for name in EXPECTED[role]:  # every series carries the role labels
            for labels, _ in series[name]:
                assert labels["role"] == role and labels["index"] == key.split("-")[1] and labels["node"], (name, labels)
        assert total(series, "nablagfn_process_resident_memory_bytes") > 1e6
        moved = total(series, MOVING[role]) - total(scraped["first"][key], MOVING[role])
        assert moved > 0, (key, MOVING[role], total(series, MOVING[role]))


def test_learner_series_carry_the_update(scraped):
    learner = scraped["last"]["learner-0"]
    terms = {labels["term"] for labels, _ in learner["nablagfn_loss"]}
    assert {"loss", "forward", "backward"} <= terms, terms
    lag_count = total(learner, "nablagfn_policy_lag_count")
    trained = total(learner, "nablagfn_trajectories_total")
    assert lag_count == trained > 0  # one lag observation per trained trajectory
    # every trained record was within max_policy_lag = 1: the le="1.0" bucket holds them all
    le1 = [v for labels, v in learner["nablagfn_policy_lag_bucket"] if labels["le"] == "1.0"]
    assert le1 == [lag_count]
    depths = {labels["stream"] for labels, _ in learner["nablagfn_stream_depth"]}
    assert {"stream:traj", "stream:scored"} <= depths, depths
