"""The GMM trainer's options: the Polyak copy, the guess source, and that an update moves the policy."""
from pathlib import Path

import torch

from nablagfn.bench.gmm.run import GMMBenchConfig, GMMProblem, Trainer
from nablagfn.bench.gmm.spec import load_spec
from nablagfn.common.config import NablaDBConfig, SamplerConfig

SPEC = load_spec(Path(__file__).resolve().parents[2] / "benchmarks" / "gmm_ring8.json")


def _trainer(**objective):
    cfg = GMMBenchConfig(batch_trajectories=8, sampler=SamplerConfig(num_steps=10, guidance_scale=0.0),
                         objective=NablaDBConfig(**objective))
    return Trainer(GMMProblem(SPEC, cfg.sampler), cfg)


def test_polyak_copy_moves_by_tau():
    tr = _trainer(target_flow_tau=0.25)
    before = [p.clone() for p in tr.flow_bar.parameters()]
    tr.update()
    for b, pb, pf in zip(before, tr.flow_bar.parameters(), tr.flow.parameters()):
        # flow_bar ← flow_bar + τ (flow − flow_bar): exact up to float32 round-off
        assert torch.allclose(pb, b + 0.25 * (pf - b), atol=1e-6)
    assert any((pb - b).abs().max() > 0 for b, pb in zip(before, tr.flow_bar.parameters()))


def test_guess_source_options_differ_only_once_the_policy_moves():
    x = torch.randn(16, 2)
    idx = torch.full((16,), 3)
    pre, pol = _trainer(guess_x0_source="pretrained"), _trainer(guess_x0_source="policy")
    assert torch.allclose(pre.guess(x, idx), pol.guess(x, idx), atol=1e-6)  # zero-initialised residual
    assert _trainer(guess_x0_source="none").guess(x, idx).abs().max() == 0
    for _ in range(3):
        pol.update()
    assert not torch.allclose(pre.guess(x, idx), pol.guess(x, idx), atol=1e-6)


def test_each_estimator_runs_an_update_with_finite_terms():
    for est in ("sampled", "stein", "stein_lambda"):
        terms = _trainer(backward_estimator=est).update()
        assert all(torch.isfinite(torch.tensor(v)) for v in terms.values()), (est, terms)
        assert terms["loss"] > 0
