"""The flow-SDE step (common/samplers/flow_sde.py), float64: it is DDIM-η on the VP-equivalent path, its
η → 0 limit is diffusers' FlowMatchEulerDiscreteScheduler Euler step, the sampler of an analytic model
keeps the path's marginals, its scores match autograd, and the residual ∇-DB loss runs on it as is."""
import math

import pytest
import torch

from nablagfn.common.config import NablaDBConfig
from nablagfn.common.flow_matching import (alpha_bar_from_sigma, eps_from_velocity_vp, flow_schedule,
                                           sigma_from_alpha_bar, to_native, to_vp)
from nablagfn.common.samplers import (backward_score, ddim_step, flow_sde_step, forward_score, get_transition,
                                      log_prob)
from nablagfn.common.samplers.flow_sde import flow_noise_std
from nablagfn.learner.objectives.nabla_db import Nets, TransitionBatch, nabla_db_loss

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
       "use_dynamic_shifting": False}
F64 = torch.float64

# Analytic model: data x₀ ~ N(m, s0² I) in d dims; v(x_t, t) = E[ε − x₀ | x_t] in closed form.
M, S0 = torch.tensor([1.5, -0.5, 0.25], dtype=F64), 0.6


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(x)[:, None]
    V = (1 - t) ** 2 * S0**2 + t**2
    d = x - (1 - t) * M
    return (t - (1 - t) * S0**2) / V * d - M


def gaussian_eps(x_vp: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The analytic model as the samplers see it: ε̂ at VP states through the velocity."""
    t = sigma_from_alpha_bar(alpha_bar)
    return eps_from_velocity_vp(gaussian_velocity(to_native(x_vp, t), t), x_vp, t)


def _pairs():
    sched = flow_schedule(SD3, 12)
    a = sched.alpha_bar
    return a[:-1], a[1:]


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_flow_sde_step_is_ddim_eta_on_the_vp_path(eta):
    """Derivation check: the native-coordinate step, rescaled, equals DDIM-η with ᾱ = s²/(s²+σ²)
    for every pair of the grid (1e-10 relative: float64 round-off amplified by a ≈ 20 at the first step)."""
    a_t, a_n = _pairs()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a_t.shape[0], 3, generator=g, dtype=F64)
    eps = torch.randn(a_t.shape[0], 3, generator=g, dtype=F64)
    f, d = flow_sde_step(x, eps, a_t, a_n, eta), ddim_step(x, eps, a_t, a_n, eta)
    for name in ("mean", "std", "x0", "x_coef", "eps_coef"):
        assert torch.allclose(getattr(f, name), getattr(d, name), rtol=1e-10, atol=1e-12), name
    assert torch.allclose(f.mean, f.x_coef * x + f.eps_coef * eps, rtol=1e-10, atol=1e-12)
    assert get_transition("flow_sde") is flow_sde_step


def test_eta_zero_is_the_euler_step_of_diffusers():
    """η = 0: c_t'·μ̃ = x_t + (t' − t) v̂, i.e. FlowMatchEulerDiscreteScheduler.step on the same
    sigmas (tolerance 2e-6: diffusers upcasts the sample to float32 and holds sigmas in float32;
    against the formula in float64, 1e-12)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    N = 6
    sched = flow_schedule(SD3, N)
    sig = sigma_from_alpha_bar(sched.alpha_bar)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=[(1000 - 1 - i * 998 / N) / 1000 for i in range(N + 1)])
    assert torch.allclose(ref.sigmas[:-1].double(), sig, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=F64)  # native state at t_0
    for i in range(N):
        t, t_n = sig[i].expand(4), sig[i + 1].expand(4)
        v = gaussian_velocity(x, t)
        st = flow_sde_step(to_vp(x, t), gaussian_eps(to_vp(x, t), alpha_bar_from_sigma(t)),
                           alpha_bar_from_sigma(t), alpha_bar_from_sigma(t_n), eta=0.0)
        assert float(st.std.max()) == 0.0
        nxt = to_native(st.mean, t_n)
        assert torch.allclose(nxt, x + (t_n - t)[:, None] * v, atol=1e-12)
        # diffusers steps from its own sigmas (float32): give it the same float32 sigmas pair
        ref._step_index = i
        dif = ref.step(v, ref.timesteps[i], x, return_dict=False)[0].double()
        expect = x.float().double() + (ref.sigmas[i + 1] - ref.sigmas[i]).double() * v
        assert torch.allclose(dif, expect, atol=2e-6)
        assert torch.allclose(dif, nxt, atol=2e-6 + 2e-6 * float(v.abs().max()))
        x = nxt


def test_small_eta_converges_to_the_ode_step():
    """‖x'(η) − x'(0)‖ = O(η) for the same noise: ν is linear in η."""
    a_t, a_n = _pairs()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(a_t.shape[0], 3, generator=g, dtype=F64)
    z = torch.randn(a_t.shape[0], 3, generator=g, dtype=F64)
    eps = gaussian_eps(x, a_t)
    base = flow_sde_step(x, eps, a_t, a_n, 0.0).sample(z)
    errs = [float((flow_sde_step(x, eps, a_t, a_n, e).sample(z) - base).abs().max()) for e in (1e-2, 1e-3, 1e-4)]
    assert errs[0] > 0 and errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5


def test_noise_level_is_the_sde_of_the_path_in_the_small_step_limit():
    """ν² ≈ g(t)² Δt with g² = 2η² t/(1−t) (Flow-GRPO's a = η√2), to first order in Δt."""
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    for eta in (0.5, 1.0):
        dt = 1e-5
        nu = flow_noise_std(t, t - dt, eta)
        assert torch.allclose(nu**2 / dt, 2 * eta**2 * t / (1 - t), rtol=1e-3)


def _chain_moments(N: int, eta: float):
    """Exact mean / variance (per coordinate) of the flow-SDE chain driven by the analytic model,
    from x̃_0 ~ N(0, I): every map is affine, so the moments propagate in closed form. Returns the
    chain's and the path's (mean, var) at every state."""
    sched = flow_schedule(SD3, N)
    a = sched.alpha_bar
    m, var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    out = [(m, var)]
    for i in range(N):
        # ε̂ is affine in x̃: read its slope and offset from two evaluations
        z0 = torch.zeros(1, 3, dtype=F64)
        e0 = gaussian_eps(z0, a[i:i + 1])
        slope = gaussian_eps(z0 + 1, a[i:i + 1]) - e0
        st0 = flow_sde_step(z0, e0, a[i:i + 1], a[i + 1:i + 2], eta)
        A = st0.x_coef + st0.eps_coef * slope  # μ̃ = A x̃ + B
        B = st0.mean
        m, var = (A * m + B)[0], (A**2 * var + st0.std**2)[0]
        out.append((m, var))
    true = [(a[i].sqrt() * M, a[i] * S0**2 + 1 - a[i]) for i in range(N + 1)]
    return out, true


def test_sampler_of_an_analytic_model_keeps_the_marginals():
    """The chain's exact marginal moments match the path's at every state up to the discretisation
    error, which shrinks like 1/N. Means: the only error is x̃_0 ~ N(0, I) instead of the marginal at
    t_0 (√ᾱ_0 ≈ 3e-4 times m), carried along — below 1e-3. Variances: plugging x̂₀ into the Gaussian step
    drops the posterior variance of x₀ (each step loses s0²(s·b − σ·s')²/V, O(Δt²)), so the terminal
    variance is low by 11% at N = 100 and 3.2% at N = 400 (measured; DDPM on SD's 100-step schedule loses
    9% by the same mechanism). Bounds: the measured values with a ~30% margin."""
    worst_var, worst_mean = {}, {}
    for N in (25, 100, 400):
        chain, true = _chain_moments(N, 1.0)
        worst_mean[N] = max(float((cm - tm).abs().max()) for (cm, _), (tm, _) in zip(chain, true))
        worst_var[N] = max(float((cv / tv - 1).abs().max()) for (_, cv), (_, tv) in zip(chain, true))
    assert max(worst_mean.values()) < 1e-3
    assert worst_var[400] < 0.042 and worst_var[100] < 0.15
    assert worst_var[400] < worst_var[100] / 2.5 < worst_var[25] / 2.5  # converges as the steps shrink
    chain, true = _chain_moments(400, 1.0)  # the terminal state: the data's moments (√ᾱ_N ≈ 1)
    assert torch.allclose(chain[-1][0], M, atol=1e-3) and torch.allclose(chain[-1][1], torch.full((3,), S0**2, dtype=F64), rtol=0.042)


def test_scores_and_log_prob_match_autograd():
    """Forward score −(x'−μ)/σ² and the VJP backward score equal autograd of log N(x'; μ(x), σ²)
    through the analytic model (float64, 1e-9 relative)."""
    a_t, a_n = _pairs()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(a_t.shape[0], 3, generator=g, dtype=F64)
    z = torch.randn(a_t.shape[0], 3, generator=g, dtype=F64)
    st = flow_sde_step(x, gaussian_eps(x, a_t), a_t, a_n, 1.0)
    xn = st.sample(z)

    def mean_fn(y):
        return flow_sde_step(y, gaussian_eps(y, a_t), a_t, a_n, 1.0).mean

    xr = x.clone().requires_grad_(True)
    xnr = xn.clone().requires_grad_(True)
    lp = log_prob(xnr, mean_fn(xr), st.std)
    gx, gxn = torch.autograd.grad(lp.sum(), (xr, xnr))
    assert torch.allclose(forward_score(xn, st.mean, st.std), gxn, rtol=1e-9, atol=1e-9)
    assert torch.allclose(backward_score(x, xn, mean_fn, st.std), gx, rtol=1e-9, atol=1e-6)
    # log_prob is the normalised Gaussian density
    d = 3
    ref = (-0.5 * ((xn - st.mean) ** 2).sum(1) / st.std[:, 0] ** 2
           - d * torch.log(st.std[:, 0]) - 0.5 * d * math.log(2 * math.pi))
    assert torch.allclose(log_prob(xn, st.mean, st.std), ref, atol=1e-9)


def test_nabla_db_objective_runs_unchanged_on_the_flow_sde_sampler():
    """The residual ∇-DB loss with sampler="flow_sde" is finite, trains the policy, and equals the
    loss of the same batch with sampler="ddim" (the same step on the VP path; 1e-9 relative)."""
    sched = flow_schedule(SD3, 10)
    a = sched.alpha_bar
    g = torch.Generator().manual_seed(4)
    K = 6
    idx = torch.tensor([0, 2, 4, 6, 8, 9])
    x = torch.randn(K, 3, generator=g, dtype=F64)
    w = torch.nn.Parameter(torch.zeros(3, dtype=F64))

    def pre(z, i):
        return gaussian_eps(z, a[i])

    def pol(z, i):
        return gaussian_eps(z, a[i]) + w * torch.tanh(z)

    st = flow_sde_step(x, pre(x, idx), a[idx], a[idx + 1], 1.0)
    xn = st.sample(torch.randn(K, 3, generator=g, dtype=F64))
    guess = torch.randn(K, 3, generator=g, dtype=F64)
    batch = TransitionBatch(x=x, x_next=xn, step_idx=idx, alpha_bar_t=a[idx], alpha_bar_next=a[idx + 1],
                            is_last=idx == 9, eps_behaviour=pre(x, idx), guess=0.1 * guess,
                            guess_next=0.1 * guess.flip(0), terminal_flow=0.2 * guess)
    flow = torch.nn.Linear(3, 3, dtype=F64)
    nets = Nets(policy_eps=pol, pretrained_eps=pre, flow=lambda z, i: flow(z), target_flow=lambda z, i: flow(z))
    with torch.no_grad():
        w.fill_(0.05)
    for est in ("sampled", "stein"):
        cfg = NablaDBConfig(backward_estimator=est, reward_scale=2.0)
        lf = nabla_db_loss(batch, nets, cfg, "flow_sde", 1.0)
        ld = nabla_db_loss(batch, nets, cfg, "ddim", 1.0)
        for k in lf:
            assert torch.isfinite(lf[k]) and torch.allclose(lf[k], ld[k], rtol=1e-9, atol=1e-12), (est, k)
        (gw,) = torch.autograd.grad(lf["loss"], w)
        assert float(gw.abs().sum()) > 0
