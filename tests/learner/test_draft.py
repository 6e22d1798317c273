"""DRaFT's truncated rollout and loss on a hand-worked linear example (float64).

With ε_θ(x) = θ·x a DDIM step is x' = (a + bθ) x + σ z (a, b, σ the step's coefficients), so for
L = mean (x_N − c)²/2 = −mean log R the chain rule gives ∂L/∂θ in closed form: the test compares
autograd through `rollout_last_steps` with it, for K = 2 and the truncated K = 1.
"""
import math

import torch

from nablagfn.common.samplers.ddim import ddim_coefficients
from nablagfn.common.samplers import ddim_step
from nablagfn.learner.objectives.draft import draft_loss, recover_noise, renoise, rollout_last_steps

ALPHA = torch.tensor([0.3, 0.7, 0.95], dtype=torch.float64)  # ᾱ of states 0, 1, 2 (N = 2)
C = 1.5  # log R(x) = −(x − c)²/2


def _coefs(i):
    a, b, s = ddim_coefficients(ALPHA[i], ALPHA[i + 1], 1.0)
    return float(a), float(b), float(s)


def _setup():
    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    x0 = torch.tensor([[0.7], [-1.2], [2.0]], dtype=torch.float64)
    z = torch.tensor([[[0.3], [-0.5]], [[1.1], [0.2]], [[-0.4], [0.9]]], dtype=torch.float64)  # (B, K=2, 1)
    return theta, x0, z


def test_k2_gradient_matches_the_chain_rule_by_hand():
    theta, x0, z = _setup()
    xN = rollout_last_steps(x0, 0, z, lambda x, idx: theta * x, ALPHA, "ddim", 1.0)
    loss = draft_loss(-(xN - C).pow(2).sum(1) / 2, reward_scale=1.0)
    (g,) = torch.autograd.grad(loss, theta)

    (a0, b0, s0), (a1, b1, s1) = _coefs(0), _coefs(1)
    th = 0.4
    x1 = (a0 + b0 * th) * x0 + s0 * z[:, 0]
    x2 = (a1 + b1 * th) * x1 + s1 * z[:, 1]
    dx2 = b1 * x1 + (a1 + b1 * th) * b0 * x0
    expected = ((x2 - C) * dx2).mean()
    # float64 throughout, same operations up to association: agreement to ~1e-15; 1e-12 leaves room
    assert torch.allclose(xN, x2, atol=1e-12, rtol=0)
    assert abs(float(g) - float(expected)) < 1e-12


def test_k1_truncates_the_gradient_at_the_start_state():
    theta, x0, z = _setup()
    a0, b0, s0 = _coefs(0)
    x1 = ((a0 + b0 * theta) * x0 + s0 * z[:, 0]).detach().requires_grad_(True)  # sampled without grad
    xN = rollout_last_steps(x1, 1, z[:, 1:], lambda x, idx: theta * x, ALPHA, "ddim", 1.0)
    (g,) = torch.autograd.grad(draft_loss(-(xN - C).pow(2).sum(1) / 2), theta)
    a1, b1, s1 = _coefs(1)
    x2 = (a1 + b1 * 0.4) * x1.detach() + s1 * z[:, 1]
    expected = ((x2 - C) * b1 * x1.detach()).mean()  # only the last step's ∂/∂θ: x1 is data
    assert abs(float(g) - float(expected)) < 1e-12
    assert x1.grad is None


def test_rollout_with_recovered_noise_reproduces_the_sampled_chain():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    eps_fn = lambda x, idx: torch.sin(x) + 0.1 * idx[:, None]  # noqa: E731  any smooth ε model
    states, zs = [x], []
    for i in range(2):
        idx = torch.full((4,), i)
        st = ddim_step(x, eps_fn(x, idx), ALPHA[i].expand(4), ALPHA[i + 1].expand(4), 1.0)
        z = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        x = st.mean + st.std * z
        states.append(x)
        zs.append(z)
    i = 1
    idx = torch.full((4,), i)
    z_rec = recover_noise(states[1], states[2], eps_fn(states[1], idx), ALPHA[1].expand(4), ALPHA[2].expand(4))
    assert torch.allclose(z_rec, zs[1], atol=1e-12)  # float64 inversion of x' = μ + σz
    xN = rollout_last_steps(states[1], 1, z_rec[:, None], eps_fn, ALPHA)
    assert torch.allclose(xN, states[2], atol=1e-12)


def test_renoise_is_the_forward_process_from_the_final_state():
    xN = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    eps = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    out = renoise(xN, 0.81, 0.9, eps)  # ratio 0.9: √0.9 x + √0.1 ε
    expected = torch.tensor([[math.sqrt(0.9) * 2 + math.sqrt(0.1) * 0.5, -math.sqrt(0.9) + math.sqrt(0.1)]],
                            dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-15)


def test_draft_loss_is_minus_beta_mean_and_skips_weightless_rows():
    log_r = torch.tensor([-1.0, float("nan"), -3.0])
    assert float(draft_loss(log_r[[0, 2]], 2.0)) == 4.0  # −2 · (−1 − 3)/2
    w = torch.tensor([1.0, 0.0, 1.0])
    assert float(draft_loss(log_r, 2.0, w)) == 4.0  # the NaN row has weight 0 and cannot leak in
