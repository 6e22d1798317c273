"""Zeroth-order residual DB: the residual by hand, and zero loss at the exact tilt of a Gaussian step."""
import math

import torch

from nablagfn.learner.objectives.residual_db import next_log_flow, residual_db_loss, residual_db_residual


def test_residual_and_loss_by_hand():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    lpre = torch.tensor([-1.5, -1.0], dtype=torch.float64, requires_grad=True)
    lf = torch.tensor([0.3, 0.1], dtype=torch.float64)
    lf_next = next_log_flow(torch.tensor([0.2, 9.9], dtype=torch.float64), torch.tensor([0.1, 0.0], dtype=torch.float64),
                            torch.tensor([-0.7, -0.4], dtype=torch.float64), torch.tensor([False, True]))
    assert lf_next.tolist() == [0.30000000000000004, -0.4]  # guess + f_ψ, then the terminal β log R
    # Δ = lp − lpre + lf − lf_next = (−1 + 1.5 + 0.3 − 0.3, −2 + 1 + 0.1 + 0.4) = (0.5, −0.5)
    t = residual_db_loss(lp, lpre, lf, lf_next)
    assert abs(float(t["loss"].detach()) - 0.25) < 1e-12 and abs(float(t["abs_residual"]) - 0.5) < 1e-12
    t["loss"].backward()
    assert torch.allclose(lp.grad, torch.tensor([0.5, -0.5], dtype=torch.float64), atol=1e-12)  # 2Δ/2 rows
    assert lpre.grad is None  # log P# is a constant
    d2 = residual_db_residual(lp, lpre, lf, lf_next, pretrained_strength=2.0)  # η = 2: −1 + 3 + 0, −2 + 2 + 0.5
    assert torch.allclose(d2, torch.tensor([2.0, 0.5], dtype=torch.float64), atol=1e-12)


def test_zero_residual_at_the_exact_tilt_of_a_gaussian_step():
    """P#(x'|x) = N(a x, σ²), F̃(x') = e^{k x'}: then F̃(x) = ∫P# F̃ = e^{k a x + σ²k²/2} and the tilted
    policy P_θ = N(a x + σ² k, σ²) balances every transition exactly (float64: Δ ~ 1e-15)."""
    a, s, k = 0.9, 0.3, 1.7
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=gen, dtype=torch.float64)
    x_next = torch.randn(50, generator=gen, dtype=torch.float64) * 2

    def log_n(y, m):
        return -(y - m) ** 2 / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)

    delta = residual_db_residual(log_n(x_next, a * x + s**2 * k), log_n(x_next, a * x),
                                 k * a * x + s**2 * k**2 / 2, k * x_next)
    assert delta.abs().max() < 1e-12
    wrong = residual_db_residual(log_n(x_next, a * x + s**2 * k), log_n(x_next, a * x), k * a * x, k * x_next)
    assert torch.allclose(wrong, torch.full_like(wrong, -s**2 * k**2 / 2))  # the normaliser is needed
