"""Flow-matching conversions (common/flow_matching.py): v ↔ ε ↔ x̂₀, the VP-equivalent path, and the
time grid from a FlowMatchEulerDiscreteScheduler config, against the definitions and diffusers."""
import numpy as np
import pytest
import torch

from nablagfn.common.flow_matching import (alpha_bar_from_sigma, eps_from_velocity, eps_from_velocity_vp,
                                           flow_schedule, flow_sigmas, is_flow_matching_config,
                                           sigma_from_alpha_bar, to_native, to_vp, velocity_from_eps,
                                           x0_from_velocity)
from nablagfn.common.prediction import x0_from_eps
from nablagfn.common.schedule import SD_SCHEDULER_CONFIG, make_schedule


def _path(seed=0, B=6, d=5):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, d, generator=g, dtype=torch.float64)
    eps = torch.randn(B, d, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x0, eps, t


def test_velocity_predictions_invert_the_path():
    """With x_t = (1−t)x₀ + tε and v = ε − x₀, the conversions return ε and x₀ exactly (float64:
    1e-12 is round-off of O(1) values)."""
    x0, eps, t = _path()
    x = (1 - t)[:, None] * x0 + t[:, None] * eps
    v = eps - x0
    assert torch.allclose(eps_from_velocity(v, x, t), eps, atol=1e-12)
    assert torch.allclose(x0_from_velocity(v, x, t), x0, atol=1e-12)
    assert torch.allclose(velocity_from_eps(eps, x, t), v, atol=1e-12)


def test_vp_rescaling_is_the_ddpm_path_with_the_same_eps_and_x0():
    """x̃ = x_t/c_t = √ᾱ x₀ + √(1−ᾱ) ε, and Tweedie's x̂₀ from (x̃, ε̂) is the velocity's x̂₀."""
    x0, eps, t = _path(1)
    x = (1 - t)[:, None] * x0 + t[:, None] * eps
    a = alpha_bar_from_sigma(t)
    xv = to_vp(x, t)
    assert torch.allclose(xv, a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * eps, atol=1e-12)
    assert torch.allclose(to_native(xv, t), x, atol=1e-12)
    v = eps - x0 + 0.1 * torch.randn_like(x0)  # any velocity, not only the true one
    e = eps_from_velocity_vp(v, xv, t)
    assert torch.allclose(e, eps_from_velocity(v, x, t), atol=1e-12)
    assert torch.allclose(x0_from_eps(e, xv, a), x0_from_velocity(v, x, t), atol=1e-12)
    assert torch.allclose(sigma_from_alpha_bar(a), t, atol=1e-12)
    assert abs(sigma_from_alpha_bar(float(a[0])) - float(t[0])) < 1e-12


def _diffusers_sigmas(cfg: dict, tau: np.ndarray, mu=None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(**cfg)
    s.set_timesteps(sigmas=list(tau), mu=mu)
    return s


@pytest.mark.parametrize("cfg,mu", [
    ({"shift": 3.0}, None),  # SD3
    ({"shift": 1.0}, None),
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 0.8),  # FLUX-style
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.3),
    ({"shift": 3.0, "shift_terminal": 0.02}, None),
])
def test_grid_is_the_schedulers_own_shifting(cfg, mu):
    """States at shift(τ_i), τ_i from (T−1)/T to 1/T, exactly as diffusers shifts the same τ
    (tolerance 1e-6: diffusers holds sigmas in float32); model timesteps are t·T."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    full = dict(FlowMatchEulerDiscreteScheduler(**cfg).config)
    N = 7
    sig = flow_sigmas(full, N, mu)
    tau = np.linspace(0.999, 0.001, N + 1)
    ref = _diffusers_sigmas(cfg, tau, mu)
    assert np.allclose(sig, ref.sigmas[:-1].double().numpy(), atol=1e-6)
    sched = flow_schedule(full, N, mu)
    assert sched.prediction_type == "flow" and sched.num_steps == N
    assert torch.allclose(sched.timesteps, torch.as_tensor(sig[:-1]) * 1000, atol=1e-9)
    assert torch.allclose(sched.alpha_bar, alpha_bar_from_sigma(torch.as_tensor(sig)), atol=1e-15)
    assert torch.all(sched.alpha_bar[1:] > sched.alpha_bar[:-1])
    assert 0 < float(sched.alpha_bar[0]) and float(sched.alpha_bar[-1]) < 1  # every step stochastic


def test_ends_are_the_training_noise_levels_inside_the_unit_interval():
    """First state: the training sigma just below pure noise; last: the scheduler's sigma_min."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sig = flow_sigmas(dict(s.config), 10)
    assert abs(sig[0] - float(s.sigmas[1])) < 1e-6 and abs(sig[-1] - s.sigma_min) < 1e-6


def test_make_schedule_dispatches_flow_configs_for_every_sampler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert is_flow_matching_config(cfg) and is_flow_matching_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert not is_flow_matching_config(SD_SCHEDULER_CONFIG)
    ref = flow_schedule(cfg, 5)
    for kind in ("flow_sde", "ddim", "dpm_sde"):
        s = make_schedule(cfg, 5, kind)
        assert torch.equal(s.alpha_bar, ref.alpha_bar) and torch.equal(s.timesteps, ref.timesteps)
    # flow_sde on an ε-model's config is DDIM-η on the DDIM grid (the same Gaussian step)
    a, b = make_schedule(SD_SCHEDULER_CONFIG, 5, "flow_sde"), make_schedule(SD_SCHEDULER_CONFIG, 5, "ddim")
    assert torch.equal(a.alpha_bar, b.alpha_bar) and torch.equal(a.timesteps, b.timesteps)
    with pytest.raises(ValueError, match="sampler kind 'euler'"):
        make_schedule(cfg, 5, "euler")


@pytest.mark.parametrize("cfg,match", [
    ({"shift": 1.0, "use_dynamic_shifting": False, "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"shift": 1.0, "use_dynamic_shifting": True}, "mu"),
    ({"shift": -2.0, "use_dynamic_shifting": False}, "shift"),
])
def test_bad_configs_name_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        flow_sigmas(cfg, 4)
