"""Residual ∇-DB loss: zero at a constructed exact solution, non-zero off it, options do what they say.

Exact solution (float64): data N(m, s₀²I), reward log R(x) = k·x (an exponential tilt), β. The
pretrained ε# is the exact ε of the noised Gaussian, so each pretrained step is linear-Gaussian and
log F̃_i (the pretrained chain's E[R^β(x_N) | x_i]) is linear: g_N = βk, g_i = J_μ#ᵀ g_{i+1}. The
tilted policy is the mean shift μ_θ = μ# + σ² g_{i+1}, the same Gaussian family, so every term of the
loss must vanish for every x' — for the sampled, stein and stein_lambda backward targets alike.
"""
import dataclasses

import pytest
import torch

from nablagfn.common.config import NablaDBConfig
from nablagfn.common.samplers import ddim_step
from nablagfn.common.schedule import SD_SCHEDULER_CONFIG, make_schedule
from nablagfn.learner.objectives.flow_param import flow_output_scale, gamma_t
from nablagfn.learner.objectives.nabla_db import Nets, TransitionBatch, nabla_db_loss, stein_lambda_targets

D = torch.float64
N_STEPS = 10
BETA = 2.0
m = torch.tensor([0.5, -1.0], dtype=D)
s0 = 0.7
k = torch.tensor([0.3, 0.8], dtype=D)
sched = make_schedule(SD_SCHEDULER_CONFIG, N_STEPS, "ddim")
ab = sched.alpha_bar


def eps_pre(x, idx):
    a = ab[idx][:, None]
    v = a * s0**2 + 1 - a
    return (1 - a).sqrt() * (x - a.sqrt() * m) / v


def step(x, eps, idx):
    return ddim_step(x, eps, ab[idx], ab[idx + 1], 1.0)


def exact_flows():
    """g_i for states 0..N by the linear backward recursion (J_μ# is a scalar multiple of I here)."""
    g = [None] * (N_STEPS + 1)
    g[N_STEPS] = BETA * k
    for i in range(N_STEPS - 1, -1, -1):
        a = ab[i]
        v = a * s0**2 + 1 - a
        st = ddim_step(torch.zeros(1, 2, dtype=D), torch.zeros(1, 2, dtype=D), ab[i:i + 1], ab[i + 1:i + 2], 1.0)
        jac = st.x_coef.item() + st.eps_coef.item() * ((1 - a).sqrt() / v).item()
        g[i] = jac * g[i + 1]
    return torch.stack(g)


G = exact_flows()
GUESS = BETA * k  # a constant guess; equals the exact terminal flow, so g_φ(x_N) = 0 at the solution


def make_nets(cfg, policy_shift=0.0, flow_shift=0.0):
    def policy_eps(x, idx):
        st = step(x, eps_pre(x, idx), idx)
        return eps_pre(x, idx) + (st.std**2 * G[idx + 1]) / st.eps_coef + policy_shift

    def flow(x, idx):
        scale = flow_output_scale(ab[idx], x, cfg.flow_output)
        return (G[idx] - GUESS) / scale + flow_shift + 0 * x

    return Nets(policy_eps=policy_eps, pretrained_eps=eps_pre, flow=flow, target_flow=flow)


def make_batch(nets, B=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, generator=gen, dtype=D)
    states = [x]
    for i in range(N_STEPS):
        idx = torch.full((B,), i)
        st = step(x, nets.policy_eps(x, idx), idx)
        x = st.sample(torch.randn(B, 2, generator=gen, dtype=D))
        states.append(x)
    states = torch.stack(states, 1)
    idx = torch.tensor([0, 3, 5, 7, 9, 9])
    rows = torch.arange(B)
    xs, xn = states[rows, idx], states[rows, idx + 1]
    return states, TransitionBatch(
        x=xs, x_next=xn, step_idx=idx, alpha_bar_t=ab[idx], alpha_bar_next=ab[idx + 1], is_last=idx == N_STEPS - 1,
        eps_behaviour=nets.policy_eps(xs, idx).detach(), guess=GUESS.expand(B, 2), guess_next=GUESS.expand(B, 2),
        terminal_flow=(BETA * k).expand(B, 2))


def with_lambda_targets(states, batch, nets, cfg, lam):
    def flow_bar_value(z, i):
        return GUESS + flow_output_scale(ab[i], z, cfg.flow_output) * nets.target_flow(z, i)

    T = stein_lambda_targets(states, ab, eps_pre, flow_bar_value, BETA * k * torch.ones(states.shape[0], 2, dtype=D),
                             lam)
    return dataclasses.replace(batch, stein_target=T[torch.arange(states.shape[0]), batch.step_idx])


ESTIMATORS = ["sampled", "stein", "stein_lambda"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("units", ["score", "eps"])
@pytest.mark.parametrize("flow_output", ["score", "eps"])
def test_every_term_is_zero_at_the_exact_solution(estimator, units, flow_output):
    cfg = NablaDBConfig(reward_scale=BETA, backward_estimator=estimator, units=units, flow_output=flow_output,
                        unet_reg_scale=10.0, stein_lambda=0.7)
    nets = make_nets(cfg)
    states, batch = make_batch(nets)
    if estimator == "stein_lambda":
        batch = with_lambda_targets(states, batch, nets, cfg, 0.7)
    terms = nabla_db_loss(batch, nets, cfg)
    # float64 round-off only: residuals are O(1e-14); 1e-18 on squares leaves 4 orders of margin.
    for name in ("forward", "backward", "terminal", "regulariser", "loss"):
        assert terms[name].item() < 1e-18, (name, terms[name].item())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_terms_detect_a_wrong_policy_and_a_wrong_flow(estimator):
    cfg = NablaDBConfig(reward_scale=BETA, backward_estimator=estimator, stein_lambda=0.7)
    nets = make_nets(cfg, policy_shift=0.1)
    states, batch = make_batch(nets)
    batch = dataclasses.replace(batch, eps_behaviour=batch.eps_behaviour - 0.05)
    cfg = dataclasses.replace(cfg, unet_reg_scale=1.0)
    if estimator == "stein_lambda":
        batch = with_lambda_targets(states, batch, nets, cfg, 0.7)
    t = nabla_db_loss(batch, nets, cfg)
    assert t["forward"].item() > 1e-4
    assert abs(t["regulariser"].item() - 0.05**2) < 1e-12  # ε_θ − ε_behaviour = 0.05 exactly
    nets = make_nets(cfg, flow_shift=0.2)
    states, batch = make_batch(nets)
    if estimator == "stein_lambda":
        batch = with_lambda_targets(states, batch, make_nets(cfg), cfg, 0.7)
    t = nabla_db_loss(batch, nets, cfg)
    assert t["backward"].item() > 1e-4 and t["terminal"].item() > 1e-4


def test_eps_units_rescale_the_forward_residual_by_sigma2_over_b():
    cfg_s = NablaDBConfig(reward_scale=BETA, units="score", no_flow=True)
    cfg_e = dataclasses.replace(cfg_s, units="eps")
    nets = make_nets(cfg_s, policy_shift=0.1)
    _, batch = make_batch(nets)
    one = torch.tensor([True] * 1 + [False] * 5)
    sub = TransitionBatch(**{f.name: (getattr(batch, f.name)[one] if getattr(batch, f.name) is not None else None)
                             for f in dataclasses.fields(batch)})
    st = step(sub.x, eps_pre(sub.x, sub.step_idx), sub.step_idx)
    ratio = (st.std**2 / st.eps_coef.abs()).item() ** 2
    # the same residual measured in two units: exact ratio up to float64 round-off
    s, e = nabla_db_loss(sub, nets, cfg_s)["forward"], nabla_db_loss(sub, nets, cfg_e)["forward"]
    assert abs(e.item() / s.item() - ratio) < 1e-9 * ratio


def test_last_step_backward_switch_and_no_flow():
    cfg = NablaDBConfig(reward_scale=BETA, backward_estimator="stein")
    nets = make_nets(cfg, flow_shift=0.2)
    _, batch = make_batch(nets)
    on = nabla_db_loss(batch, nets, cfg)["backward"]
    off = nabla_db_loss(batch, nets, dataclasses.replace(cfg, last_step_backward=False))["backward"]
    assert on.item() != pytest.approx(off.item())
    only_last = TransitionBatch(**{f.name: (getattr(batch, f.name)[batch.is_last] if getattr(batch, f.name) is not None
                                            else None) for f in dataclasses.fields(batch)})
    assert nabla_db_loss(only_last, nets, dataclasses.replace(cfg, last_step_backward=False))["backward"].item() == 0.0
    nf = nabla_db_loss(batch, nets, dataclasses.replace(cfg, no_flow=True))
    assert nf["backward"].item() == 0.0 and nf["terminal"].item() == 0.0


def test_forward_loss_trains_flow_only_when_configured():
    lin = torch.nn.Linear(2, 2, dtype=D)
    cfg = NablaDBConfig(reward_scale=BETA, backward_estimator="stein", terminal_loss=False, reverse_loss_scale=0.0)
    base = make_nets(cfg, policy_shift=0.1)
    nets = dataclasses.replace(base, flow=lambda x, i: base.flow(x, i) + lin(x), target_flow=lambda x, i: base.flow(x, i))
    _, batch = make_batch(base)
    for trains, expect in ((False, False), (True, True)):
        lin.zero_grad()
        nabla_db_loss(batch, nets, dataclasses.replace(cfg, forward_trains_flow=trains))["loss"].backward()
        has = lin.weight.grad is not None and lin.weight.grad.abs().sum().item() > 0
        assert has == expect


def test_stein_lambda_endpoints():
    """λ=1 is the full-horizon product of Jacobians; λ=0 is the one-step target on the Polyak flow."""
    cfg = NablaDBConfig(reward_scale=BETA)
    nets = make_nets(cfg, flow_shift=0.3)  # a wrong flow: λ=1 must ignore it, λ=0 must use it
    states, _ = make_batch(nets)
    B = states.shape[0]
    fv = lambda z, i: GUESS + flow_output_scale(ab[i], z, cfg.flow_output) * nets.target_flow(z, i)  # noqa: E731
    T1 = stein_lambda_targets(states, ab, eps_pre, fv, (BETA * k).expand(B, 2), 1.0)
    assert torch.allclose(T1[:, 0], G[0].expand(B, 2), atol=1e-12)
    T0 = stein_lambda_targets(states, ab, eps_pre, fv, (BETA * k).expand(B, 2), 0.0)
    jac0 = (G[0] / G[1])[0]
    wrong_next = fv(states[:, 1], torch.full((B,), 1))
    assert torch.allclose(T0[:, 0], jac0 * wrong_next, atol=1e-12)


def test_gamma_options():
    a = torch.tensor([0.25, 0.81], dtype=D)
    assert torch.equal(gamma_t(a, "squared"), a)
    assert torch.allclose(gamma_t(a, "sqrt"), torch.tensor([0.5, 0.9], dtype=D))
    assert torch.equal(gamma_t(a, "one"), torch.ones(2, dtype=D))
    with pytest.raises(ValueError):
        gamma_t(a, "cubed")


def test_forward_point_pretrained_mean_reads_the_flow_at_mu_pretrained():
    """forward_point=pretrained_mean asks μ_θ − μ# = σ² ∇log F̃(μ#), not σ² ∇log F̃(x').

    With a flow that varies in x (∇log F̃_i(z) = G_i + c·z below the terminal state), the policy
    built from the flow at μ# zeroes the forward term at fwd_point = μ# but not at x' = x_next.
    """
    cfg = NablaDBConfig(reward_scale=BETA, backward_estimator="stein")
    c = 0.4

    def flow_at(z, i):
        return G[i] + c * z * (i < N_STEPS).to(D)[:, None]

    def policy_eps(x, idx):
        st = step(x, eps_pre(x, idx), idx)
        return eps_pre(x, idx) + st.std**2 * flow_at(st.mean, idx + 1) / st.eps_coef

    def flow(z, idx):
        return (flow_at(z, idx) - GUESS) / flow_output_scale(ab[idx], z, cfg.flow_output)

    nets = Nets(policy_eps=policy_eps, pretrained_eps=eps_pre, flow=flow, target_flow=flow)
    _, batch = make_batch(nets)
    mu = step(batch.x, eps_pre(batch.x, batch.step_idx), batch.step_idx).mean
    at_mean = dataclasses.replace(batch, fwd_point=mu, fwd_guess=GUESS.expand_as(mu),
                                  fwd_terminal_flow=(BETA * k).expand_as(mu))
    # float64 round-off at the exact policy (1e-18 on squares); c·|x' − μ#| ~ 0.1 off it
    assert nabla_db_loss(at_mean, nets, cfg)["forward"].item() < 1e-18
    assert nabla_db_loss(batch, nets, cfg)["forward"].item() > 1e-4
