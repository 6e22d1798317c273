"""DDPO's PPO-clip loss, per-prompt advantages and the per-step log-probability, by hand."""
import math

import torch

from nablagfn.common.samplers.ddim import ddim_coefficients
from nablagfn.learner.objectives.ddpo import per_prompt_advantages, ppo_clip_loss, transition_log_prob


def test_ppo_clip_loss_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1], dtype=torch.float64)
    new = ratio.log().requires_grad_(True)
    old = torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    t = ppo_clip_loss(new, old, adv, clip=0.2)
    # row 0: max(−1.5, −1.2) = −1.2 (clipped); row 1: max(0.5, 0.8) = 0.8 (clipped); row 2: −2.2
    assert abs(float(t["loss"].detach()) - (-1.2 + 0.8 - 2.2) / 3) < 1e-12
    t["loss"].backward()
    # clipped rows pass no gradient; row 2: ∂(−A r)/∂log r = −A r = −2.2, over 3 rows
    assert torch.allclose(new.grad, torch.tensor([0.0, 0.0, -2.2 / 3], dtype=torch.float64), atol=1e-12)
    assert abs(float(t["clipfrac"]) - 2 / 3) < 1e-12
    assert abs(float(t["approx_kl"]) - 0.5 * float((ratio.log() ** 2).mean())) < 1e-12


def test_advantages_are_clipped():
    new = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    t = ppo_clip_loss(new, torch.zeros(1, dtype=torch.float64), torch.tensor([10.0], dtype=torch.float64),
                      clip=0.2, adv_clip_max=5.0)
    assert float(t["loss"].detach()) == -5.0


def test_per_prompt_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 20.0, 5.0], dtype=torch.float64)
    prompts = ["a", "a", "b", "b", "c"]
    adv = per_prompt_advantages(r, prompts, min_count=2)
    batch_std = math.sqrt(107 - 7.8**2)  # population std of the batch: mean of squares 535/5 − mean²
    expected = torch.tensor([-1, 1, -1, 1, (5 - 7.8) / batch_std], dtype=torch.float64)
    # the +1e-6 in the denominators moves values by < 1e-6 (stds here are ≥ 1)
    assert torch.allclose(adv, expected, atol=1e-5)
    # with a history for "c" ([4, 6] + this 5: mean 5) its own statistics apply
    adv_h = per_prompt_advantages(r, prompts, min_count=2, history={"c": [4.0, 6.0]})
    assert abs(float(adv_h[4])) < 1e-9 and torch.allclose(adv_h[:4], expected[:4], atol=1e-5)


def test_transition_log_prob_is_the_gaussian_density_of_the_step():
    a_t, a_n = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
    x = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    eps = torch.tensor([[0.2, 0.4]], dtype=torch.float64)
    x_next = torch.tensor([[0.5, -0.9]], dtype=torch.float64)
    a, b, s = (float(v) for v in ddim_coefficients(a_t, a_n, 1.0))
    mu = [a * 0.3 + b * 0.2, a * -1.0 + b * 0.4]
    expected = sum(-(xn - m) ** 2 / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)
                   for xn, m in zip([0.5, -0.9], mu))
    assert abs(float(transition_log_prob(x, x_next, eps, a_t, a_n)) - expected) < 1e-12
