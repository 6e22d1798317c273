"""The reward worker in process, with a real embedded Redis and the tiny SD pipeline: valid records
are scored through the float32 VAE and written before their entry is acked; corrupt, oversized or
wrong-schema records and non-finite rewards go to the dead-letter stream with a reason while the
worker keeps going; entries a dead consumer left pending are taken over."""
import threading
import time

import pytest
import torch

from nablagfn.actors.sampler_actor import SamplerActor
from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.models import lora_state_dict
from nablagfn.common.transport import (SCHEMA_VERSION, LoraRegistry, ScoredRecord, StreamClient,
                                       TrajectoryRecord, encode)
from nablagfn.common.transport.keys import LEARNER_GROUP, REWARD_GROUP, RunKeys
from nablagfn.rewards_service.rewards import BrightnessReward, log_reward_and_grad, register_reward
from nablagfn.rewards_service.worker import RewardWorker

RUN = "run-worker-test"
POISON = "poison"
SMALL = ["sampler.num_steps=4", "chunk_trajectories=4", "flow_net.block_out_channels=[32]",
         "subsample.timestep_fraction=0.5", "threads=1", "distributed.sampler_batch=2", "distributed.poll_s=0.01",
         "distributed.block_ms=20", "reward.name=test_worker_poison_nan", "reward.chunk_size=3"]


class PoisonReward(BrightnessReward):
    """Brightness, but NaN for every image whose prompt is 'poison'."""

    def log_reward(self, images, prompts=None):
        out = super().log_reward(images, prompts)
        bad = torch.tensor([p == POISON for p in prompts], device=out.device)
        return torch.where(bad, torch.full_like(out, float("nan")), out)


register_reward("test_worker_poison_nan")(lambda cfg, device=None: PoisonReward())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_dir, tmp_path, *extra):
    return build_config(TrainConfig, load_preset("tiny"), {"run_dir": str(tmp_path / "run"), "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", *SMALL, *extra])


def _records(cfg, server, n_rounds=1):
    """Real trajectory records from a sampler actor at policy version 0."""
    sampler = SamplerActor(cfg, 0, server.url, RUN)
    client = StreamClient.from_url(server.url)
    LoraRegistry(client.conn, prefix=RunKeys.from_config(cfg.distributed).lora_prefix).publish(
        lora_state_dict(sampler.policy.pipe.unet), version=0)
    client.close()
    assert sampler.wait_for_policy(5)
    out = [r for _ in range(n_rounds) for r in sampler.sample_records()]
    sampler.close()
    return out


def test_worker_scores_dead_letters_and_keeps_going(tiny_dir, tmp_path, server):
    cfg = _cfg(tiny_dir, tmp_path, "distributed.redis.max_record_bytes=200000", "distributed.reward_batch=8")
    keys = RunKeys.from_config(cfg.distributed)
    traj_stream, scored_stream = keys.traj_streams[0], keys.scored_streams[0]
    good = _records(cfg, server, n_rounds=2)
    poisoned = TrajectoryRecord(meta={**good[3].meta, "prompt": POISON}, tensors=good[3].tensors)
    too_big = TrajectoryRecord(meta={**good[2].meta, "pad": "x" * 300_000}, tensors=good[2].tensors)
    client = StreamClient.from_url(server.url)
    worker = RewardWorker(cfg, 0, server.url)
    client.ensure_group(scored_stream, LEARNER_GROUP)
    payloads = [good[0].to_msg(), b"\xc1not msgpack", too_big.to_msg(),
                encode({"schema": 1, "kind": "trajectory", "meta": good[1].meta, "tensors": good[1].tensors}),
                poisoned.to_msg(), good[1].to_msg()]
    for p in payloads:
        assert client.add(traj_stream, p, max_depth=100)
    written = 0
    for _ in range(4):
        written += worker.step(block_ms=20)
    assert written == 2 and worker.counters["scored"] == 2
    assert worker.counters["dead_lettered"] == 4 and worker.counters["non_finite"] == 1
    dead = client.dead_letters(traj_stream)
    reasons = " | ".join(d["reason"] for d in dead)
    assert "malformed message" in reasons and "exceeds the limit of 200000" in reasons
    assert f"schema: version 1, expected {SCHEMA_VERSION}" in reasons
    (nan,) = [d for d in dead if d["reason"].startswith("non-finite reward")]
    assert "final" in nan["reason"] and nan["payload"] == payloads[4]  # kept for inspection
    # every traj entry is acked (and deleted); the scored ones wait for the learner
    assert client.depth(traj_stream) == 0 and client.pending(traj_stream, REWARD_GROUP) == 0
    entries = client.read(scored_stream, LEARNER_GROUP, "t", count=10)
    scored = [ScoredRecord.from_msg(p) for _, p in entries]
    assert [s.traj_id for s in scored] == [good[0].traj_id, good[1].traj_id]
    for s, src in zip(scored, good[:2]):
        assert "query_x0" not in s.tensors and s.meta["reward_name"] == "test_worker_poison_nan"
        rows = torch.cat([src.tensors["query_x0"], src.tensors["final"][None]])
        ref = log_reward_and_grad(rows, worker.scorer.vae, worker.scorer.reward, [src.meta["prompt"]] * rows.shape[0], chunk=2)
        # Tolerance 1e-5 relative: the same float32 VAE and reward, other batch compositions
        # (float32 summation order only).
        torch.testing.assert_close(s.tensors["query_log_r"], ref.log_r[:-1].float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s.tensors["query_grad"], ref.grad[:-1].float(), rtol=1e-5, atol=1e-9)
        assert abs(s.log_reward - float(ref.log_r[-1])) <= 1e-5 * abs(float(ref.log_r[-1]))
        torch.testing.assert_close(s.tensors["grad_final"], ref.grad[-1].float(), rtol=1e-5, atol=1e-9)
    assert next(worker.scorer.vae.parameters()).dtype == torch.float32
    worker.close()
    client.close()


def test_worker_reclaims_a_dead_consumers_entries_and_acks_only_after_writing(tiny_dir, tmp_path, server):
    cfg = _cfg(tiny_dir, tmp_path, "distributed.reclaim_idle_ms=50", "distributed.redis.max_stream_depth=2",
               "distributed.reward_batch=1")
    keys = RunKeys.from_config(cfg.distributed)
    traj_stream, scored_stream = keys.traj_streams[0], keys.scored_streams[0]
    recs = _records(cfg, server)
    client = StreamClient.from_url(server.url)
    worker = RewardWorker(cfg, 0, server.url)
    for r in recs:
        client.add(traj_stream, r.to_msg(), max_depth=10)
    # a consumer reads the first entry and dies without acking
    assert len(client.read(traj_stream, REWARD_GROUP, "reward-dead", count=1)) == 1
    time.sleep(0.1)
    assert worker.step(block_ms=20) == 1  # the dead consumer's entry, reclaimed
    assert worker.counters["reclaimed"] == 1
    client.ensure_group(scored_stream, LEARNER_GROUP)
    got = client.read(scored_stream, LEARNER_GROUP, "t", count=5)
    assert [ScoredRecord.from_msg(p).traj_id for _, p in got] == [recs[0].traj_id]
    assert client.pending(traj_stream, REWARD_GROUP) == 0

    # the scored stream is full (depth bound 2): the worker scores but cannot write; stopped, the
    # entry stays pending on the traj stream (not acked), for a later worker to reclaim
    client.add(scored_stream, b"filler", max_depth=10)
    assert client.depth(scored_stream) == 2
    threading.Timer(0.3, lambda: client.conn.client.set(keys.stop_key, 1)).start()
    assert worker.step(block_ms=20) == 0
    assert client.pending(traj_stream, REWARD_GROUP) == 1 and client.depth(traj_stream) == 1
    assert client.depth(scored_stream) == 2
    client.conn.client.delete(keys.stop_key)
    client.ack(scored_stream, LEARNER_GROUP, [i for i, _ in got])  # room again
    time.sleep(0.1)
    assert worker.step(block_ms=20) == 1  # its own stale pending entry, reclaimed and written
    assert client.pending(traj_stream, REWARD_GROUP) == 0 and client.depth(traj_stream) == 0
    worker.close()
    client.close()
