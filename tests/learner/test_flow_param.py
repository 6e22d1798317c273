"""The flow guess β γ_t ∇_x log R(x̂₀(x)) and the g_φ output scaling."""
import torch

from nablagfn.learner.objectives.flow_param import chain_to_x, flow_guess, flow_output_scale, flow_value

D = torch.float64


def test_vjp_chain_rule_matches_autograd_and_diagonal_is_its_identity_part():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, generator=gen, dtype=D)
    a = torch.tensor([0.3, 0.6], dtype=D)
    eps_fn = lambda z: torch.tanh(z @ W)  # noqa: E731
    x0_fn = lambda z: (z - (1 - a)[:, None].sqrt() * eps_fn(z)) / a[:, None].sqrt()  # noqa: E731
    logr = lambda y: -(y**2).sum(1) / 2  # noqa: E731
    x = torch.randn(2, 3, generator=gen, dtype=D)
    grad_x0 = -x0_fn(x)
    z = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(logr(x0_fn(z)).sum(), z)
    assert torch.allclose(chain_to_x(x, grad_x0, a, x0_fn, "vjp"), ref, atol=1e-12)  # round-off only
    assert torch.allclose(chain_to_x(x, grad_x0, a, x0_fn, "diagonal"), grad_x0 / a[:, None].sqrt(), atol=0)
    g = flow_guess(x, grad_x0, a, beta=3.0, gamma="squared", x0_fn=x0_fn, x0_grad="vjp")
    assert torch.allclose(g, 3.0 * a[:, None] * ref, atol=1e-12)
    assert not g.requires_grad


def test_flow_output_units():
    a = torch.tensor([0.75, 0.19], dtype=D)
    raw = torch.ones(2, 2, dtype=D)
    guess = torch.full((2, 2), 0.5, dtype=D)
    assert torch.allclose(flow_value(raw, guess, a, "eps"), 0.5 + 1 / (1 - a)[:, None].sqrt().expand(2, 2))
    assert torch.allclose(flow_value(raw, guess, a, "score"), torch.full((2, 2), 1.5, dtype=D))
    assert flow_output_scale(a, raw, "score").item() == 1.0
