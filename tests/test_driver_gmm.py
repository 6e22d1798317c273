"""`bench gmm --distributed` in process (sampler, reward worker and learner classes on a real embedded
Redis, no Ray): the learner's batch built from scored records has exactly the one-process trainer's
guesses and Stein targets at the same states, and updates train within the lag bound."""
import pytest
import torch

from nablagfn.bench.distributed_gmm import (GMMLearnerActor, GMMRewardWorker, GMMSamplerActor,
                                            default_distributed, check_supported)
from nablagfn.bench.gmm.run import GMMBenchConfig
from nablagfn.bench.gmm.spec import load_spec
from nablagfn.common.config_io import ConfigError, build_config
from nablagfn.common.transport import ScoredRecord
from nablagfn.learner.objectives.nabla_db import stein_lambda_targets
from nablagfn.learner.record_batch import update_data

SPEC = "benchmarks/gmm_ring8.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gmm_service_batch_is_the_one_process_batch(tmp_path, server):
    spec = load_spec(SPEC)
    cfg = build_config(GMMBenchConfig, {"updates": 3, "batch_trajectories": 8, "hidden": 32, "emb_dim": 16},
                       overrides=["objective.flow_potential=true", "objective.flow_output=score",
                                  "objective.value_loss_scale=1.0", "objective.value_lambda=0.5"])
    dcfg = default_distributed(cfg)
    learner = GMMLearnerActor(spec, cfg, dcfg, server.url, "gmm-test", str(tmp_path / "learner"))
    sampler = GMMSamplerActor(spec, cfg, dcfg, 0, server.url, "gmm-test")
    worker = GMMRewardWorker(spec, cfg, dcfg, 0, server.url)
    assert sampler.wait_for_policy(5) and sampler.version == 0
    records = [ScoredRecord.from_msg(s.to_msg()) for s in worker.score(sampler.sample_records(8))]
    data = update_data(records)
    model, tr = learner.model, learner.model.trainer
    p, N = model.problem, cfg.sampler.num_steps
    table = model.guess_table(data)
    q = data.queries
    inner = q.state < N
    # the reward service's ∇log R at the sampler's x̂₀, chained in the learner, is the guess the
    # one-process trainer computes from the exact reward: the same float32 ops on the same numbers
    torch.testing.assert_close(table[q.traj[inner], q.state[inner]], tr.guess(q.x[inner], q.state[inner]),
                               rtol=0, atol=1e-6)
    states = data.traj.states
    import nablagfn.bench.gmm.exact as exact
    torch.testing.assert_close(table[:, N], cfg.objective.reward_scale * exact.grad_log_reward(spec, states[:, N]),
                               rtol=0, atol=1e-6)
    first = int(data.keep.min())
    from nablagfn.learner.objectives.flow_param import flow_value
    ob = cfg.objective

    def from_table(z, i):
        return flow_value(tr.raw_flow(tr.flow_bar, z, i), table[:, int(i[0])], p.alpha_bar[i], ob.flow_output)

    args = (ob.stein_lambda, p.sampler.kind, p.sampler.eta)
    T_service = stein_lambda_targets(states, p.alpha_bar, p.pretrained_eps, from_table, table[:, N], *args,
                                     first_step=first)
    T_local = stein_lambda_targets(states, p.alpha_bar, p.pretrained_eps,
                                   lambda z, i: tr.flow_estimate(z, i, tr.flow_bar), table[:, N], *args,
                                   first_step=first)
    torch.testing.assert_close(T_service, T_local, rtol=1e-5, atol=1e-6)  # float32 round-off of one VJP chain

    # the value term: λ-return log-flow targets from the carried ε path and the service's log R
    assert data.traj.keep_idx is None  # the records carried the behaviour ε from the first kept step
    V_service, vtab = model.value_terms(data, first)
    V_local = tr.value_targets(states, data.traj.eps, exact.log_reward(spec, states[:, N].double()).float())
    torch.testing.assert_close(V_service, V_local[:, first:], rtol=1e-5, atol=1e-5)  # same float32 ops, other order
    K = data.keep.shape[1]
    rows, idx = torch.arange(8)[:, None].expand(8, K).reshape(-1), data.keep.reshape(-1)
    torch.testing.assert_close(vtab[rows, idx], tr.guess_value(states[rows, idx], idx), rtol=1e-6, atol=1e-6)

    for _ in range(3):  # three updates, each on two fresh rounds of 4
        sampler.step()
        sampler.step()
        worker.step(block_ms=20)
        m = learner.update()
        assert all(0 <= m["trained_at_version"] - v <= dcfg.max_policy_lag for v in m["sampled_versions"])
        assert m["loss"] == m["loss"]  # finite, not NaN
    assert learner.version == 3 and sampler.version == 2  # the sampler loaded each new version
    if model.ema is not None:  # policy_ema: the weight average is published beside every version
        from nablagfn.bench.distributed_gmm import ema_registry
        reg = ema_registry(learner.registry.conn, learner.keys, dcfg)
        assert reg.latest_version() == 3
        for k, v in reg.fetch(3).items():
            assert torch.equal(v, model.ema[k]), k
    for a in (learner, sampler, worker):
        a.close()


def test_unsupported_options_are_named():
    cfg = build_config(GMMBenchConfig, {"objective": {"forward_point": "pretrained_mean"}})
    with pytest.raises(ConfigError, match="objective.forward_point"):
        check_supported(cfg)
    with pytest.raises(ConfigError, match="oracle"):
        check_supported(build_config(GMMBenchConfig, {"oracle_policy": True}))
