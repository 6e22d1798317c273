"""The value term of residual ∇-DB: log-space residual DB on the scalar potential (nabla_db.py).

Checks, in float64: ℓ equals the Gaussian log-density difference (η = 1) or differs from it by an
x-independent constant (η ≠ 1); the λ-return recursion by hand; telescoping — when ℓ is a difference
of a potential f, every λ-return target equals f exactly; and path-by-path exactness at the tilted
policy of the Gaussian/exponential-tilt case, where log F̃ is linear in x.
"""
import pytest
import torch

from nablagfn.common.config import NablaDBConfig
from nablagfn.common.config_io import ConfigError, validate
from nablagfn.common.samplers import ddim_step, log_prob
from nablagfn.common.schedule import SD_SCHEDULER_CONFIG, make_schedule
from nablagfn.learner.objectives.nabla_db import (Nets, TransitionBatch, log_flow_targets, log_ratio,
                                                  value_loss)

D = torch.float64


def test_log_ratio_is_the_gaussian_log_density_difference():
    g = torch.Generator().manual_seed(0)
    x_next, mu_p, mu_q = (torch.randn(5, 3, generator=g, dtype=D) for _ in range(3))
    std = torch.tensor(0.3, dtype=D)
    want = log_prob(x_next, mu_p, std) - log_prob(x_next, mu_q, std)
    torch.testing.assert_close(log_ratio(x_next, mu_p, mu_q, std, 1.0), want, rtol=0, atol=1e-12)
    # η ≠ 1: off by a constant that depends on σ only (float64 round-off: 1e-12)
    diff = log_ratio(x_next, mu_p, mu_q, std, 0.5) - (log_prob(x_next, mu_p, std) - 0.5 * log_prob(x_next, mu_q, std))
    torch.testing.assert_close(diff - diff[0], torch.zeros_like(diff), rtol=0, atol=1e-12)


def test_lambda_return_by_hand():
    ell = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    term = torch.tensor([10.0], dtype=D)
    boot = torch.tensor([[0.0, 20.0, 30.0, 99.0]], dtype=D)  # column N is never read
    # λ = 1: V_i = 10 − Σ_{s≥i} ℓ_s
    torch.testing.assert_close(log_flow_targets(ell, term, boot, 1.0), torch.tensor([[4.0, 5.0, 7.0]], dtype=D))
    # λ = 0: V_2 = −3 + 10, V_1 = −2 + boot_2, V_0 = −1 + boot_1
    torch.testing.assert_close(log_flow_targets(ell, term, boot, 0.0), torch.tensor([[19.0, 28.0, 7.0]], dtype=D))
    # λ = 0.5: V_1 = −2 + 0.5·30 + 0.5·7 = 16.5, V_0 = −1 + 0.5·20 + 0.5·16.5 = 17.25
    torch.testing.assert_close(log_flow_targets(ell, term, boot, 0.5),
                               torch.tensor([[17.25, 16.5, 7.0]], dtype=D))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_targets_telescope_to_the_potential(lam):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4, 7, generator=g, dtype=D)  # f(x_i) along 4 paths of N = 6 steps
    ell = f[:, 1:] - f[:, :-1]
    V = log_flow_targets(ell, f[:, -1], f, lam)
    torch.testing.assert_close(V, f[:, :-1], rtol=0, atol=1e-12)


def test_full_horizon_target_is_exact_path_by_path_at_the_tilted_policy():
    """Gaussian data N(m, s₀²), log R = k·x: log F̃_i(x) = g_i·x + c_i with g_N = βk, g_i = J_μ#ᵀ g_{i+1},
    and the tilted policy μ_θ = μ# + σ² g_{i+1}. Then V_i − g_i·x_i is the same on every path."""
    N, beta = 8, 2.0
    m, s0, k = torch.tensor([0.5, -1.0], dtype=D), 0.7, torch.tensor([0.3, 0.8], dtype=D)
    ab = make_schedule(SD_SCHEDULER_CONFIG, N, "ddim").alpha_bar

    def eps_pre(x, i):
        a = ab[i]
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s0**2 + 1 - a)

    def step(x, eps, i):
        B = x.shape[0]
        return ddim_step(x, eps, ab[i].expand(B), ab[i + 1].expand(B), 1.0)

    G = [None] * (N + 1)
    G[N] = beta * k
    for i in range(N - 1, -1, -1):
        z = torch.zeros(1, 2, dtype=D, requires_grad=True)
        (G[i],) = torch.autograd.grad(step(z, eps_pre(z, i), i).mean, z, grad_outputs=G[i + 1][None])
        G[i] = G[i][0]
    g = torch.Generator().manual_seed(2)
    B = 64
    x = torch.randn(B, 2, generator=g, dtype=D)
    states, ell = [x], []
    for i in range(N):
        pre = step(x, eps_pre(x, i), i)
        mu_pol = pre.mean + pre.std**2 * G[i + 1]
        x_next = mu_pol + pre.std * torch.randn(B, 2, generator=g, dtype=D)
        ell.append(log_ratio(x_next, mu_pol, pre.mean, pre.std, 1.0))
        states.append(x_next)
        x = x_next
    S = torch.stack(states, 1)
    V = log_flow_targets(torch.stack(ell, 1), beta * (S[:, -1] @ k), torch.zeros(B, N + 1, dtype=D), 1.0)
    resid = V - torch.stack([S[:, i] @ G[i] for i in range(N)], 1)
    # the per-step constants c_i remain; across paths the spread is float64 round-off (1e-10)
    assert float((resid - resid.mean(0)).abs().max()) < 1e-10


def test_value_loss_needs_a_potential_and_targets():
    cfg = NablaDBConfig(flow_potential=True, flow_output="score", value_loss_scale=1.0, value_fit="mean")
    x = torch.zeros(2, 3)
    batch = TransitionBatch(x=x, x_next=x, step_idx=torch.zeros(2, dtype=torch.long), alpha_bar_t=torch.ones(2),
                            alpha_bar_next=torch.ones(2), is_last=torch.zeros(2, dtype=torch.bool), eps_behaviour=x,
                            guess=x, guess_next=x, terminal_flow=x)
    zero = lambda z, i: torch.zeros_like(z)  # noqa: E731
    with pytest.raises(ValueError, match="scalar potential"):
        value_loss(batch, Nets(zero, zero, zero, zero), cfg)
    batch.log_flow_target, batch.guess_value = torch.tensor([1.0, 3.0]), torch.zeros(2)
    nets = Nets(zero, zero, zero, zero, potential=lambda z, i: torch.ones(z.shape[0]))
    # residuals 1 − 1 = 0 and 1 − 3 = −2: mean square 2
    assert float(value_loss(batch, nets, cfg)) == pytest.approx(2.0)
    # log-mean-exp fit: r = V − log F̃ = (0, 2) → 2 · mean(0, e² − 2 − 1) = e² − 3
    cfg.value_fit = "log_mean_exp"
    assert float(value_loss(batch, nets, cfg)) == pytest.approx(float(torch.exp(torch.tensor(2.0))) - 3, rel=1e-6)


def test_value_options_are_validated():
    with pytest.raises(ConfigError, match="value_loss_scale"):
        validate(NablaDBConfig(value_loss_scale=1.0))  # no potential
    with pytest.raises(ConfigError, match="flow_potential"):
        validate(NablaDBConfig(flow_potential=True, flow_output="eps"))


def test_log_mean_exp_fit_is_minimised_at_log_mean_exp():
    """d/dc mean(e^{V−c} − (V−c) − 1) = 1 − mean(e^{V−c}) vanishes at c = log mean e^V (float64)."""
    from nablagfn.learner.objectives.nabla_db import log_mean_exp_loss

    V = torch.tensor([-1.0, 0.0, 1.0, 2.5], dtype=D)
    c_star = torch.logsumexp(V, 0) - torch.log(torch.tensor(4.0, dtype=D))

    def grad_at(c):
        c = torch.tensor(float(c), dtype=D, requires_grad=True)
        (g,) = torch.autograd.grad(log_mean_exp_loss(V - c).mean(), c)
        return float(g)

    assert abs(grad_at(c_star)) < 1e-12
    assert grad_at(c_star - 0.1) < 0 < grad_at(c_star + 0.1)  # a convex bowl around it
    assert float(V.mean()) < float(c_star)  # the squared fit (E[V]) would sit lower: Jensen
    # beyond the clip the loss is linear: its slope stays bounded
    r = torch.tensor([10.0, 20.0], dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(log_mean_exp_loss(r, clip=4.0).sum(), r)
    torch.testing.assert_close(g, torch.full_like(g, float(torch.exp(torch.tensor(4.0))) - 1))
