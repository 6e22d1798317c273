"""The learner side of the distributed service, in process, with a real embedded Redis and the tiny
SD pipeline: scored records rebuild exactly the update the one-process trainer makes on the same
samples; the learner drops stale records, never trains a trajectory twice, dead-letters bad
records and keeps going; a restarted learner resumes from its checkpoint."""
import torch

from nablagfn.actors.sampler_actor import SamplerActor
from nablagfn.actors.trajectory_records import needed_eps, trajectory_records
from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.models import lora_state_dict
from nablagfn.common.policy import needed_states
from nablagfn.common.transport import ScoredRecord, StreamClient, TrajectoryRecord, encode
from nablagfn.common.transport.keys import LEARNER_GROUP, RunKeys
from nablagfn.learner.learner_actor import LearnerActor
from nablagfn.learner.local_trainer import LocalTrainer
from nablagfn.learner.nabla_db_step import plan_flow_queries, score_flow_queries
from nablagfn.learner.record_batch import update_data
from nablagfn.rewards_service.worker import RewardWorker

import pytest

RUN = "run-test"
SMALL = ["sampler.num_steps=4", "batch_trajectories=4", "train_batch_trajectories=0", "chunk_trajectories=4",
         "flow_net.block_out_channels=[32]", "subsample.timestep_fraction=0.5", "objective.reward_scale=1e4",
         "threads=1", "distributed.sampler_batch=2", "distributed.block_ms=20", "distributed.poll_s=0.01"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_dir, run_dir, *extra, updates=2):
    return build_config(TrainConfig, load_preset("tiny"),
                        {"updates": updates, "run_dir": str(run_dir), "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", *SMALL, *extra])


@pytest.mark.parametrize("extra", [
    [],  # the default objective: λ-return Stein target, pretrained x̂₀ guess
    ["objective.forward_point=pretrained_mean", "objective.backward_estimator=stein"],
    # the scalar-potential flow with the value term: records carry the behaviour ε path
    ["objective.flow_potential=true", "objective.flow_output=score", "objective.value_loss_scale=1.0",
     "objective.value_lambda=0.5"],
])
def test_rebuilt_batch_is_the_one_process_update(tiny_dir, tmp_path, server, extra):
    """Sample + plan + score as the one-process trainer does; send the same samples through
    trajectory records, a reward worker and the wire; the learner's transition batch (every input of
    the loss: states, ε_behaviour, guesses with the chain rule, Stein targets, forward points)
    is the same."""
    cfg = _cfg(tiny_dir, tmp_path / "run", *extra)
    tr = LocalTrainer(cfg)
    traj, keep, cond, prompts = tr.sample(3)
    queries, fwd = plan_flow_queries(tr.models, traj, keep, cond, cfg)
    scored = score_flow_queries(queries, tr.vae, tr.reward, prompts, cfg.reward.chunk_size)
    from nablagfn.learner.nabla_db_step import UpdateData
    local = UpdateData(traj, keep, cond, prompts, queries, scored, fwd)

    records = trajectory_records(traj, keep, cond, [0, 1, 2], prompts, queries, fwd,
                                 needed_states(keep, cfg.sampler.num_steps, cfg),
                                 timesteps=tr.schedule.timesteps,
                                 meta={"run_id": RUN, "policy_version": 0, "sampler": "ddim", "num_steps": 4},
                                 actor="sampler-0", eps_steps=needed_eps(keep.cpu(), cfg.sampler.num_steps, cfg))
    worker = RewardWorker(cfg, 0, server.url)
    wire = [ScoredRecord.from_msg(s.to_msg()) for s in worker.score(
        [TrajectoryRecord.from_msg(r.to_msg()) for r in records])]
    worker.close()
    rebuilt = update_data(wire)

    for name in ("state", "traj", "row"):
        assert torch.equal(getattr(rebuilt.queries, name), getattr(local.queries, name)), name
    assert torch.equal(rebuilt.queries.x, local.queries.x)  # float32 on the wire: exact
    # Tolerance 1e-5 relative: the worker scores the same latents through the same VAE and reward in
    # other batch compositions, which changes float32 summation order only (measured ~1e-7).
    torch.testing.assert_close(rebuilt.scored.log_r, local.scored.log_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rebuilt.scored.grad, local.scored.grad, rtol=1e-5, atol=1e-8)
    a, b = tr.learner.transition_batch(local), tr.learner.transition_batch(rebuilt)
    for f in ("x", "x_next", "step_idx", "eps_behaviour", "guess", "guess_next", "terminal_flow",
              "stein_target", "fwd_point", "fwd_guess", "log_flow_target", "guess_value"):
        va, vb = getattr(a, f), getattr(b, f)
        assert (va is None) == (vb is None), f
        if va is not None:  # same tolerance and reason as above (the guesses are linear in ∇log R)
            torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6, msg=f)
    if "objective.value_loss_scale=1.0" in extra:
        assert "eps_idx" in records[0].tensors and b.log_flow_target is not None
    if not extra:  # the default objective needs every state from the earliest kept step on
        first = int(keep.min())
        rec = records[0].tensors
        carried = set(rec["state_idx"].tolist()) | set(rec["step_idx"].tolist()) | set((rec["step_idx"] + 1).tolist())
        assert carried | {4} >= set(range(first, 5))


def _scored_records(cfg, server, n_rounds=2):
    """Real scored records: a sampler actor (policy version 0 published by `publish0`) + a worker."""
    sampler = SamplerActor(cfg, 0, server.url, RUN)
    worker = RewardWorker(cfg, 0, server.url)
    assert sampler.wait_for_policy(5)
    out = []
    for _ in range(n_rounds):
        out += worker.score(sampler.sample_records())
    sampler.close()
    worker.close()
    assert all(isinstance(s, ScoredRecord) for s in out)
    return out


def _push(streams, keys, payload):
    return streams.add(keys.scored_streams[0], payload, max_depth=1000)


def test_learner_drops_stale_dedups_dead_letters_and_resumes(tiny_dir, tmp_path, server):
    cfg = _cfg(tiny_dir, tmp_path / "run", "batch_trajectories=2", "distributed.max_policy_lag=2", updates=5)
    keys = RunKeys.from_config(cfg.distributed)
    learner = LearnerActor(cfg, server.url, RUN)
    assert learner.version == 0 and not learner.resumed
    recs = _scored_records(cfg, server)  # four records sampled at version 0
    assert [r.policy_version for r in recs] == [0, 0, 0, 0]
    streams = StreamClient.from_url(server.url)

    # bad entries first: garbage, a record of another run, a re-sent (duplicate) record
    other = ScoredRecord(meta={**recs[1].meta, "run_id": "someone-else"}, tensors=recs[1].tensors)
    for payload in (b"\x93garbage", encode({"schema": 2}), other.to_msg(),
                    recs[0].to_msg(), recs[0].to_msg(), recs[1].to_msg()):
        _push(streams, keys, payload)
    m = learner.update()
    assert m["traj_ids"] == [recs[0].traj_id, recs[1].traj_id]  # the copy of recs[0] was skipped
    assert m["trained_at_version"] == 0 and m["version"] == 1 and m["lag_max"] == 0
    assert learner.counters["duplicates"] == 1 and learner.counters["dead_lettered"] == 3
    reasons = [d["reason"] for d in streams.dead_letters(keys.scored_streams[0])]
    assert any("malformed" in r for r in reasons) and any("meta.run_id" in r for r in reasons)
    assert streams.pending(keys.scored_streams[0], LEARNER_GROUP) == 0  # acked after the checkpoint
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()

    # version 1 → 3: records of version 0 are now 3 versions old (> max_policy_lag = 2): dropped,
    # including a re-sent one (its id is forgotten once no copy could be admitted any more)
    learner.publish()
    learner.publish()
    assert learner.version == 3 and set(learner.seen) == set()
    fresh = _scored_records(cfg, server, n_rounds=1)  # sampled at version 3
    assert {r.policy_version for r in fresh} == {3}
    for r in (recs[2], recs[1], fresh[0], fresh[0], fresh[1]):
        _push(streams, keys, r.to_msg())
    m = learner.update()
    assert m["traj_ids"] == [r.traj_id for r in fresh] and m["sampled_versions"] == [3, 3]
    assert learner.counters["dropped_stale"] == 2 and learner.counters["duplicates"] == 2
    state = {k: v.clone() for k, v in lora_state_dict(learner.model.pipe.unet).items()}
    flow_bar = {k: v.clone() for k, v in learner.model.models.flow_bar.state_dict().items()}
    steps, version, seen = learner.model.optimizer_steps, learner.version, dict(learner.seen)
    assert version == 4 and seen == {fresh[0].traj_id: 3, fresh[1].traj_id: 3}

    # the learner dies after reading an entry it never acked; a new one resumes from the checkpoint
    _push(streams, keys, recs[3].to_msg())
    learner.streams.read_many(keys.scored_streams, LEARNER_GROUP, "learner", count=1)
    assert streams.pending(keys.scored_streams[0], LEARNER_GROUP) == 1
    learner.close()
    again = LearnerActor(cfg, server.url, RUN)
    assert again.resumed and again.updates == 2 and again.model.optimizer_steps == steps
    assert again.version == version + 1  # it republishes its weights as the next version
    assert again.seen == seen  # version 5 − 3 ≤ 2: still admissible, still remembered
    for k, v in lora_state_dict(again.model.pipe.unet).items():
        assert torch.equal(v, state[k]), k
    for k, v in again.model.models.flow_bar.state_dict().items():
        assert torch.equal(v, flow_bar[k]), k
    assert again.model.learner.opt.state_dict()["state"].keys() == learner.model.learner.opt.state_dict()["state"].keys()
    _push(streams, keys, fresh[1].to_msg())  # trained before the restart: a duplicate
    for r in _scored_records(cfg, server, n_rounds=1):
        _push(streams, keys, r.to_msg())
    m = again.update()
    # the entry the dead learner held is reclaimed, but it is version 0 (lag 5): dropped
    assert again.counters["dropped_stale"] == 3 and again.counters["duplicates"] == 3
    assert m["update"] == 3 and set(m["sampled_versions"]) == {version + 1}
    assert streams.pending(keys.scored_streams[0], LEARNER_GROUP) == 0
    again.close()
    streams.close()
