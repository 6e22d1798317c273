"""ReFL: stop steps in the late range, and the gradient of −β log R(x̂₀) on a linear ε model (float64)."""
import math

import pytest
import torch

from nablagfn.learner.objectives.refl import draw_stop_steps, first_stop_step, refl_loss, refl_x0


def test_stop_steps_cover_exactly_the_late_range():
    s = draw_stop_steps(4000, 10, 0.5, torch.Generator().manual_seed(0))
    assert set(s.tolist()) == {5, 6, 7, 8, 9}  # 4000 draws of 5 values: each appears (miss prob ~1e-380)
    assert first_stop_step(10, 0.95) == 9 and set(draw_stop_steps(50, 10, 0.95).tolist()) == {9}
    assert first_stop_step(50, 0.0) == 0
    with pytest.raises(ValueError, match="min_step_fraction"):
        first_stop_step(10, 1.0)


def test_gradient_by_hand_for_a_linear_eps_model():
    # ε_θ(x) = θ x, x̂₀ = (x − √(1−ᾱ) θ x)/√ᾱ, log R = −(x̂₀ − c)²/2, L = −β mean log R
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0], [-0.5], [2.5]], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.9, 0.6, 0.99], dtype=torch.float64)
    c, beta = 0.8, 3.0
    x0 = refl_x0(x, theta * x.detach(), a)
    loss = refl_loss(-(x0 - c).pow(2).sum(1) / 2, beta)
    loss.backward()
    xv, av = x.detach()[:, 0], a
    x0_hand = (xv - (1 - av).sqrt() * 0.3 * xv) / av.sqrt()
    d_x0 = -(1 - av).sqrt() * xv / av.sqrt()
    expected = beta * ((x0_hand - c) * d_x0).mean()
    # float64, same formula: ~1e-16 apart; 1e-12 leaves room for reassociation
    assert torch.allclose(x0[:, 0], x0_hand, atol=1e-12)
    assert abs(float(theta.grad) - float(expected)) < 1e-12
    assert x.grad is None  # refl_x0 treats x_s as data: the gradient goes through ε_θ only


def test_refl_loss_numbers():
    assert math.isclose(float(refl_loss(torch.tensor([-2.0, -4.0]), 0.5)), 1.5)
