"""Sampler MDP steps against diffusers' schedulers, and scores against autograd (float64)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from nablagfn.common.samplers import backward_score, ddim_step, dpm_sde_step, forward_score, log_prob
from nablagfn.common.schedule import SD_SCHEDULER_CONFIG, make_schedule

# 1e-6 in float64 is far above rounding (~1e-15) but below any formula slip (O(1e-3) or more).
TOL = 1e-6


def _eps_model(x, t):
    return torch.tanh(0.3 * x + 0.001 * t) + 0.1 * x.flip(-1)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(eta, prediction_type):
    cfg = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    sched = DDIMScheduler(**cfg)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    sched.set_timesteps(10)
    ours = make_schedule(cfg, 10, "ddim")
    assert torch.equal(ours.timesteps, sched.timesteps.long())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    from nablagfn.common.prediction import eps_from_output
    for i, t in enumerate(sched.timesteps):
        out = _eps_model(x, t)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        a_t, a_n = ours.alpha_bar[i].expand(3), ours.alpha_bar[i + 1].expand(3)
        eps = eps_from_output(out, x, a_t, prediction_type)
        step = ddim_step(x, eps, a_t, a_n, eta)
        mine = step.sample(noise)
        assert (mine - ref).abs().max().item() < TOL
        # the affine form μ = a·x + b·ε is the same mean
        assert (step.x_coef * x + step.eps_coef * eps - step.mean).abs().max().item() < 1e-12
        x = ref


def test_dpm_sde_matches_diffusers():
    cfg = dict(SD_SCHEDULER_CONFIG)
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="sde-dpmsolver++", solver_order=1, final_sigmas_type="sigma_min",
        timestep_spacing="linspace", lower_order_final=True)
    sched.set_timesteps(8)
    ours = make_schedule(dict(cfg, timestep_spacing="linspace"), 8, "dpm_sde")
    assert torch.equal(ours.timesteps, sched.timesteps.long())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    for i, t in enumerate(sched.timesteps):
        eps = _eps_model(x, t)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        ref = sched.step(eps, t, x, variance_noise=noise).prev_sample.double()
        step = dpm_sde_step(x, eps, ours.alpha_bar[i].expand(2), ours.alpha_bar[i + 1].expand(2))
        mine = step.sample(noise)
        # diffusers holds sigmas in float32 internally: 1e-5 relative is its rounding, not ours.
        assert (mine - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
        assert (step.x_coef * x + step.eps_coef * eps - step.mean).abs().max().item() < 1e-12
        assert (step.std > 0).all()
        x = ref


def test_scores_match_autograd_of_gaussian_log_density():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    W = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    eps_fn = lambda z: torch.sin(z @ W)  # noqa: E731
    a_t, a_n = torch.full((4,), 0.3, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    mean_fn = lambda z: ddim_step(z, eps_fn(z), a_t, a_n, 1.0).mean  # noqa: E731
    step = ddim_step(x, eps_fn(x), a_t, a_n, 1.0)
    x_next = step.sample(torch.randn(x.shape, generator=gen, dtype=torch.float64))

    def ref_logp(z, zn):
        mu = mean_fn(z)
        var = step.std**2
        return (-0.5 * (zn - mu) ** 2 / var - 0.5 * torch.log(2 * np.pi * var)).sum()

    zn = x_next.clone().requires_grad_(True)
    z = x.clone().requires_grad_(True)
    lp = ref_logp(z, zn)
    g_z, g_zn = torch.autograd.grad(lp, (z, zn))
    per_row = (-0.5 * (x_next - step.mean) ** 2 / step.std**2 - 0.5 * torch.log(2 * np.pi * step.std**2)).sum(1)
    assert torch.allclose(log_prob(x_next, step.mean, step.std), per_row, atol=1e-10)
    assert torch.allclose(per_row.sum(), lp.detach(), atol=1e-10)
    # float64 autograd of the same density: agreement to 1e-10 is rounding only
    assert (forward_score(x_next, step.mean, step.std) - g_zn).abs().max() < 1e-10
    assert (backward_score(x, x_next, mean_fn, step.std) - g_z).abs().max() < 1e-10


def test_dpm_sde_rejects_eta():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="eta"):
        dpm_sde_step(x, x, torch.tensor([0.3]), torch.tensor([0.5]), eta=0.5)
