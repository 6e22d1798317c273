"""The baselines through the distributed data path: a batch sampled as the one-process trainer
samples it, sent through trajectory records, a real reward worker and the wire, gives the baseline
learner of the distributed service (`BaselineLearnerModel`) the same update as the one-process
learner on the same samples — for every method. Records carry what the method reads and no more,
and a record missing it is refused naming the field."""
import pytest
import torch

from nablagfn.actors.trajectory_records import record_steps, trajectory_records
from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.models import load_lora_state_dict, lora_state_dict
from nablagfn.common.transport import RecordError, ScoredRecord, TrajectoryRecord
from nablagfn.learner.baseline_model import BaselineLearnerModel, full_eps_table
from nablagfn.learner.local_trainer import LocalTrainer
from nablagfn.learner.nabla_db_step import plan_flow_queries
from nablagfn.learner.record_batch import check_record
from nablagfn.rewards_service.worker import RewardWorker

RUN = "run-test"
N = 4
SMALL = [f"sampler.num_steps={N}", "batch_trajectories=3", "train_batch_trajectories=0", "chunk_trajectories=4",
         "subsample.timestep_fraction=0.5", "objective.reward_scale=1e4", "threads=1", "draft.k=2",
         "refl.min_step_fraction=0.5"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_dir, run_dir, method):
    return build_config(TrainConfig, load_preset("tiny"), {"updates": 1, "run_dir": str(run_dir), "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", f"method={method}", *SMALL])


def _records(tr, cfg, traj, keep, cond, prompts):
    queries, fwd = plan_flow_queries(tr.models, traj, keep, cond, cfg)
    states, eps_steps = record_steps(keep, N, cfg)
    return trajectory_records(traj, keep, cond, list(range(len(prompts))), prompts, queries, fwd, states,
                              timesteps=tr.schedule.timesteps,
                              meta={"run_id": RUN, "policy_version": 0, "sampler": cfg.sampler.kind, "num_steps": N},
                              actor="sampler-0", eps_steps=eps_steps)


def test_full_eps_table_scatters_kept_rows():
    eps = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    keep = torch.tensor([[0, 2], [1, 3]])
    full = full_eps_table(eps, keep, keep, 4)
    assert full.shape == (2, 4, 3)
    assert torch.equal(full[0, 2], eps[0, 1]) and torch.equal(full[1, 1], eps[1, 0])
    assert torch.equal(full[0, 1], torch.zeros(3)) and full_eps_table(full, keep, None, 4) is full


@pytest.mark.parametrize("method", ["draft", "draft-lv", "refl", "ddpo", "residual-db"])
def test_distributed_baseline_update_is_the_one_process_update(tiny_dir, tmp_path, server, method):
    cfg = _cfg(tiny_dir, tmp_path / "run", method)
    tr = LocalTrainer(cfg)
    model = BaselineLearnerModel(cfg)
    load_lora_state_dict(model.pipe.unet, lora_state_dict(tr.pipe.unet))  # the same starting policy
    if method == "residual-db":
        model.learner.log_flow.load_state_dict(tr.learner.log_flow.state_dict())
    traj, keep, cond, prompts = tr.sample(3)
    with torch.no_grad():
        log_r = tr.learner.log_reward(traj.final, prompts)

    records = _records(tr, cfg, traj, keep, cond, prompts)
    t0 = records[0].tensors
    assert "query_state" not in t0 or t0["query_state"].numel() == 0  # baselines read no flow
    if method == "draft":  # the last K = 2 states and their ε ride along
        assert set(t0["eps_idx"].tolist()) | set(t0["step_idx"].tolist()) >= {2, 3}
    if method in ("ddpo", "residual-db", "draft-lv"):
        assert "eps_idx" not in t0 and "states" not in t0  # nothing beyond the kept transitions
    worker = RewardWorker(cfg, 0, server.url)
    wire = [ScoredRecord.from_msg(s.to_msg()) for s in worker.score(
        [TrajectoryRecord.from_msg(r.to_msg()) for r in records])]
    worker.close()
    for rec in wire:
        model.check(rec, RUN)
    # the worker's rewards are the trainer's (same latents, VAE and reward; float32 order only, ~1e-7)
    torch.testing.assert_close(torch.tensor([r.log_reward for r in wire]), log_r.cpu(), rtol=1e-5, atol=1e-6)

    logs_local = tr.learner.learn(traj.states, traj.eps, keep, cond, prompts, log_r)
    logs_dist = model.train(wire)
    assert logs_dist["optimizer_steps"] == logs_local["optimizer_steps"] >= 1
    # One AdamW step each, from the same weights on the same samples and the same method draws.
    # Tolerance 1e-4 relative on the gradients: only float32 summation order differs (rewards above).
    g_local = [p.grad for p in tr.learner.lora_params]
    g_dist = [p.grad for p in model.learner.lora_params]
    assert any(float(g.abs().max()) > 0 for g in g_local)
    for a, b in zip(g_local, g_dist):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(logs_dist["loss"], logs_local["loss"], rtol=1e-4, atol=1e-7)


def test_a_draft_record_without_the_last_k_steps_is_refused(tiny_dir, tmp_path, server):
    cfg = _cfg(tiny_dir, tmp_path / "run", "draft")
    tr = LocalTrainer(cfg)
    traj, keep, cond, prompts = tr.sample(1)
    keep = torch.tensor([[0, 1]])  # the kept steps do not cover the last K = 2
    rec = _records(tr, cfg, traj, keep, cond, prompts)[0]
    rec.tensors.pop("eps_idx")
    rec.tensors.pop("eps_path")
    worker = RewardWorker(cfg, 0, server.url)
    scored = worker.score([TrajectoryRecord.from_msg(rec.to_msg())])[0]
    worker.close()
    with pytest.raises(RecordError, match="eps_path.*draft"):
        check_record(scored, cfg, tr.schedule.timesteps, RUN)  # the gate BaselineLearnerModel.check applies
