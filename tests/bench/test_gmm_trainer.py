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


def test_potential_flow_is_the_gradient_of_phi_and_the_value_term_trains_it():
    tr = _trainer(flow_potential=True, flow_output="score", value_loss_scale=1.0)
    with torch.no_grad():  # give Φ a non-zero output layer so the gradient is not trivially zero
        tr.flow.out.weight.normal_(0, 0.1)
    x, idx = torch.randn(4, 2), torch.full((4,), 5)
    g = tr.raw_flow(tr.flow, x, idx)
    h = 1e-2  # float32 central differences: O(h²) truncation plus ~1e-7/h round-off, well under 1e-3
    for j in range(2):
        e = torch.zeros_like(x)
        e[:, j] = h
        fd = (tr.potential(tr.flow, x + e, idx) - tr.potential(tr.flow, x - e, idx)) / (2 * h)
        torch.testing.assert_close(g[:, j], fd.detach(), rtol=0, atol=1e-3)
    before = [p.clone() for p in tr.flow.parameters()]
    terms = tr.update()
    assert terms["value"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert any((p - b).abs().max() > 0 for b, p in zip(before, tr.flow.parameters()))


def test_default_bench_objective_is_the_potential_with_the_value_term():
    ob = GMMBenchConfig().objective
    assert ob.flow_potential and ob.value_loss_scale > 0 and ob.value_fit == "log_mean_exp"


def test_weight_ema_averages_and_swaps_back():
    from nablagfn.bench.gmm.models import WeightEMA

    net = torch.nn.Linear(2, 1)
    ema = WeightEMA(net, decay=0.75)
    ema.updates = 100  # past the warm-up: the decay is 0.75 itself (warm-up: (1+u)/(10+u) = 0.1 at u = 0)
    assert ema.current_decay() == 0.75 and WeightEMA(net, 0.75).current_decay() == 0.1
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()  # shadow ← shadow + 0.25 (p − shadow) = start + 0.25
    with ema.applied():
        for s, p in zip(start, net.parameters()):
            torch.testing.assert_close(p, s + 0.25)
    for s, p in zip(start, net.parameters()):  # the online weights are back
        torch.testing.assert_close(p, s + 1.0)
