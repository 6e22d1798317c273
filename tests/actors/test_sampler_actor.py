"""The sampler actor as a plain class, with a real embedded Redis and the tiny SD pipeline: it waits
for a published policy, loads newer LoRA versions (verified) and stamps records with them, writes
one valid record per trajectory carrying what the learner's objective needs, and pauses while the
trajectory stream is at its depth bound."""
import threading
import time

import pytest
import torch

from nablagfn.actors.sampler_actor import SamplerActor
from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.models import lora_state_dict
from nablagfn.common.transport import (LoraRegistry, RecordError, ScoredRecord, StreamClient,
                                       TrajectoryRecord)
from nablagfn.common.transport.keys import RunKeys

RUN = "run-sampler-test"
SMALL = ["sampler.num_steps=4", "batch_trajectories=4", "chunk_trajectories=4", "flow_net.block_out_channels=[32]",
         "subsample.timestep_fraction=0.5", "threads=1", "distributed.sampler_batch=2", "distributed.poll_s=0.01"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_dir, tmp_path, *extra):
    return build_config(TrainConfig, load_preset("tiny"), {"run_dir": str(tmp_path / "run"), "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", *SMALL, *extra])


def _registry(server, cfg):
    client = StreamClient.from_url(server.url)
    return client, LoraRegistry(client.conn, prefix=RunKeys.from_config(cfg.distributed).lora_prefix)


def test_sampler_follows_published_versions_and_writes_valid_records(tiny_dir, tmp_path, server):
    from nablagfn.learner.record_batch import check_record  # the learner's gate, used as an oracle

    cfg = _cfg(tiny_dir, tmp_path)
    sampler = SamplerActor(cfg, 0, server.url, RUN)
    assert not sampler.wait_for_policy(0.1)  # nothing published yet
    with pytest.raises(RuntimeError, match="no policy version"):
        sampler.sample_records()
    client, registry = _registry(server, cfg)
    lora0 = lora_state_dict(sampler.policy.pipe.unet)
    v1 = {k: v + 0.05 * torch.randn_like(v) for k, v in lora0.items()}  # lora_B no longer zero
    registry.publish(lora0, version=0)
    assert sampler.wait_for_policy(5) and sampler.version == 0
    assert sampler.step() == 2
    registry.publish(v1)  # version 1: a different policy
    assert sampler.step() == 2 and sampler.version == 1
    for k, v in lora_state_dict(sampler.policy.pipe.unet).items():
        assert torch.equal(v, v1[k]), k  # loaded exactly
    assert [v for v, _ in sampler.versions_loaded] == [0, 1]

    keys = RunKeys.from_config(cfg.distributed)
    client.ensure_group(keys.traj_streams[0], "t")
    entries = client.read_many(keys.traj_streams, "t", "t", count=10)
    recs = [TrajectoryRecord.from_msg(p) for _, _, p in entries]
    assert [r.policy_version for r in recs] == [0, 0, 1, 1]
    assert len({r.traj_id for r in recs}) == 4 and all(r.traj_id.startswith("sampler-0-") for r in recs)
    timesteps = sampler.policy.schedule.timesteps
    for r in recs:  # what the learner needs: schema-valid, and every state/query its objective reads
        scored_like = r.tensors | {"grad_final": torch.zeros(r.tensors["final"].shape)}
        Q = r.tensors["query_state"].shape[0]
        scored_like |= {"query_log_r": torch.zeros(Q), "query_grad": torch.zeros(Q, *r.tensors["final"].shape)}
        sr = ScoredRecord(meta=r.meta | {"log_reward": 0.0, "reward_name": "x"}, tensors=scored_like)
        sr.validate()
        check_record(sr, cfg, timesteps, RUN)
        assert r.tensors["x_t"].dtype == torch.float32 and r.meta["num_steps"] == 4
    # the same noise under two policies gives different samples only if the LoRA acts: version 1's
    # ε differs from the pretrained ε at the same input
    x = torch.randn(1, 4, 16, 16)
    cond = sampler.policy.denoiser.encode_prompts(["cat"])
    with torch.no_grad():
        e_pol = sampler.policy.denoiser.eps(x, torch.tensor([500]), cond, sampler.policy.uncond, 5.0, adapter=True)
        e_pre = sampler.policy.denoiser.eps(x, torch.tensor([500]), cond, sampler.policy.uncond, 5.0, adapter=False)
    assert (e_pol - e_pre).abs().max() > 1e-4

    # a blob of the wrong shapes is refused, counted and not fetched again; the current policy stays
    # and sampling goes on; the next good version is loaded
    bad = {k: torch.zeros(2, 2) for k in lora0}
    registry.publish(bad)
    with pytest.raises(RecordError, match="shape"):
        registry.fetch(2, sampler.expected)
    assert not sampler.refresh_policy() and not sampler.refresh_policy()
    assert sampler.version == 1 and sampler.counters["lora_rejected"] == 1 and sampler.rejected_versions == {2}
    assert sampler.step() == 2 and sampler.version == 1
    registry.publish(lora0)
    assert sampler.refresh_policy() and sampler.version == 3
    sampler.close()
    client.close()


def test_sampler_pauses_at_the_depth_bound_and_stops_on_request(tiny_dir, tmp_path, server):
    cfg = _cfg(tiny_dir, tmp_path, "distributed.redis.max_stream_depth=3")
    sampler = SamplerActor(cfg, 1, server.url, RUN)
    client, registry = _registry(server, cfg)
    registry.publish(lora_state_dict(sampler.policy.pipe.unet), version=0)
    keys = RunKeys.from_config(cfg.distributed)
    assert sampler.wait_for_policy(5)
    assert sampler.step() == 2  # depth 2 < 3: room
    def stop_once_full(watcher=StreamClient.from_url(server.url)):
        while watcher.depth(keys.traj_streams[0]) < 3:
            time.sleep(0.01)
        time.sleep(0.3)  # the sampler is now waiting on a full stream
        watcher.conn.client.set(keys.stop_key, 1)
        watcher.close()

    stopper = threading.Thread(target=stop_once_full)
    stopper.start()
    # depth 2 < 3: the round starts; its second XADD finds the stream full and waits until stopped
    assert sampler.step() == 0
    stopper.join()
    assert client.depth(keys.traj_streams[0]) == 3  # the bound held exactly
    assert sampler.counters["seconds_paused"] >= 0.25 and sampler.counters["records"] == 3
    assert sampler.run() == sampler.stats()  # the stop key is set: no more rounds
    assert client.depth(keys.traj_streams[0]) == 3
    client.conn.client.delete(keys.stop_key)
    stopper = threading.Timer(0.3, lambda: client.conn.client.set(keys.stop_key, 1))
    stopper.start()
    assert sampler.step() == 0  # full: it waits before sampling, and stops on request
    stopper.join()
    assert sampler.counters["rounds"] == 1
    sampler.close()
    client.close()
