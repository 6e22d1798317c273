"""`nablagfn train` in distributed mode, end to end on a real local Ray runtime and an embedded Redis
with the tiny SD pipeline: 2 sampler actors, a reward worker and the learner run a few updates;
every trained trajectory was sampled at most max_policy_lag versions before the update that used
it and is trained once; the samplers pick up the new LoRA versions; the run dir holds the outputs.
Unreachable Redis / Ray addresses fail fast with a clear message."""
import json
import time

import pytest
import torch

from nablagfn.cli import main

SMALL = ["sampler.num_steps=4", "batch_trajectories=2", "train_batch_trajectories=0", "chunk_trajectories=4",
         "flow_net.block_out_channels=[32]", "subsample.timestep_fraction=0.5", "objective.reward_scale=1e4",
         "threads=1", "eval_trajectories=4", "grid_size=2",
         "distributed.sampler_batch=1", "distributed.max_policy_lag=1", "distributed.redis.max_stream_depth=3",
         "distributed.block_ms=50", "distributed.poll_s=0.02", "distributed.startup_timeout_s=240",
         # 2 logical CPUs in all, as the machine has
         "distributed.sampler.num_cpus=0.5", "distributed.reward.num_cpus=0.5", "distributed.learner.num_cpus=0.5"]
UPDATES = 3


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distributed_run")
    rc = main(["train", "--preset", "tiny", "--updates", str(UPDATES), "--run-dir", str(run_dir), "--no-progress",
               f"model.pretrained={tiny_dir}", *SMALL])
    assert rc == 0
    return run_dir


def test_distributed_run_writes_its_outputs(run, tiny_dir):
    for name in ("config.yaml", "run_id", "metrics.jsonl", "trained.jsonl", "summary.json",
                 "lora/pytorch_lora_weights.safetensors", "flow_net.safetensors", "checkpoint/state.json",
                 "curves.png", "reward_vs_diversity.png", "samples_pretrained.png", "samples_final.png", "report.json"):
        assert (run / name).is_file(), name
    assert "error" not in json.loads((run / "report.json").read_text())  # the report's samples were drawn
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in metrics] == list(range(1, UPDATES + 1))
    assert [m["version"] for m in metrics] == list(range(1, UPDATES + 1))  # publish_every = 1
    for m in metrics:
        for key in ("reward_mean", "loss", "forward", "backward", "grad_norm_lora", "grad_norm_flow"):
            assert isinstance(m[key], float), key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == UPDATES and summary["learner"]["trained"] == 2 * UPDATES
    assert summary["dead_letters"] == 0 and len(summary["samplers"]) == 2 and len(summary["reward_workers"]) == 1
    # the final LoRA reloads through plain diffusers and is the learner's last checkpoint
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from nablagfn.common.models import lora_state_dict
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.load_lora_weights(run / "lora")
    ckpt = load_file(str(run / "checkpoint" / "lora.safetensors"))
    loaded = lora_state_dict(pipe.unet, adapter_name=next(iter(pipe.unet.peft_config)))
    assert loaded.keys() == ckpt.keys()
    assert all(torch.equal(loaded[k], ckpt[k]) for k in ckpt)
    assert any(k.endswith("lora_B.weight") or "lora.up" in k for k in ckpt)
    assert max(float(v.abs().max()) for k, v in ckpt.items() if "lora_B" in k or "lora.up" in k) > 0  # trained


def test_each_trajectory_trained_once_within_the_lag_bound(run):
    trained = [json.loads(x) for x in (run / "trained.jsonl").read_text().splitlines()]
    assert len(trained) == 2 * UPDATES
    assert len({t["traj_id"] for t in trained}) == len(trained)  # at most once
    for t in trained:
        assert 0 <= t["trained_at_version"] - t["sampled_version"] <= 1  # max_policy_lag


def test_samplers_pick_up_new_versions(run):
    summary = json.loads((run / "summary.json").read_text())
    trained = [json.loads(x) for x in (run / "trained.jsonl").read_text().splitlines()]
    assert max(t["sampled_version"] for t in trained) >= 1  # trained on data of an updated policy
    for s in summary["samplers"]:
        versions = [v for v, _ in s["versions_loaded"]]
        assert versions[0] == 0 and versions == sorted(versions) and max(versions) >= 1, s


def test_unreachable_redis_fails_fast(tiny_dir, tmp_path, capsys):
    t0 = time.perf_counter()
    rc = main(["train", "--preset", "tiny", "--redis-url", "redis://:secret@127.0.0.1:1/0", "--run-dir", str(tmp_path / "r"),
               "--no-progress", f"model.pretrained={tiny_dir}", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 30
    assert "cannot reach Redis at redis://***@127.0.0.1:1/0" in err and "secret" not in err


def test_unreachable_ray_address_fails_fast(tiny_dir, tmp_path, capsys):
    t0 = time.perf_counter()
    rc = main(["train", "--preset", "tiny", "--ray-address", "127.0.0.1:1", "--run-dir", str(tmp_path / "r"), "--no-progress",
               f"model.pretrained={tiny_dir}", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 30
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in err


def test_stream_depth_is_bounded_by_what_the_learner_can_still_use():
    from nablagfn.common.config import TrainConfig
    from nablagfn.common.config_io import build_config
    from nablagfn.driver import useful_depth

    cfg = build_config(TrainConfig, {"batch_trajectories": 8}, overrides=["distributed.max_policy_lag=1"])
    # (lag + 1) · publish_every · batch over two streams = 8, but the learner holds 8 un-acked until
    # its checkpoint (checkpoint_every = 1): 9, below the configured 256
    assert useful_depth(cfg) == 9
    cfg = build_config(TrainConfig, {"batch_trajectories": 8}, overrides=[
        "distributed.max_policy_lag=0", "distributed.checkpoint_every=3"])
    assert useful_depth(cfg) == 25  # never below the un-acked records between checkpoints + 1
    cfg = build_config(TrainConfig, {"batch_trajectories": 64}, overrides=["distributed.max_policy_lag=9"])
    assert useful_depth(cfg) == 256  # the configured bound still caps it (useful: 320)


def test_without_an_address_the_driver_starts_its_own_runtime_despite_a_recorded_cluster(monkeypatch):
    """A `ray start` that died without `ray stop` leaves its address in <ray tmp>/ray_current_cluster;
    a plain `ray.init()` would try to join it and fail. The driver (no --ray-address, no RAY_ADDRESS)
    starts a runtime of its own with the roles' resources instead."""
    import shutil
    import tempfile
    from pathlib import Path

    import ray

    from nablagfn.common.config import TrainConfig
    from nablagfn.common.config_io import build_config
    from nablagfn.driver import start_ray

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (Path(tmp) / "ray").mkdir()
    (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # a cluster that is gone
    cfg = build_config(TrainConfig, {}, overrides=[o for o in SMALL if "num_cpus" in o])
    assert not ray.is_initialized()
    try:
        assert start_ray(cfg, None)
        assert ray.cluster_resources()["CPU"] == 2  # 4 actors × 0.5 CPU: our own runtime, sized for the run
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
