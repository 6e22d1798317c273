"""The analytic rewards: formulas, shapes, smoothness (float64 gradcheck), input checks."""
import pytest
import torch

from nablagfn.rewards_service.rewards import BrightnessReward, ColorReward, RewardError


def test_brightness_formula():
    x = torch.rand(3, 3, 5, 6)
    # same reduction, float32: agreement to rounding (~1e-7 on values O(1)).
    torch.testing.assert_close(BrightnessReward(scale=2.0)(x), 2.0 * x.mean(dim=(1, 2, 3)))


def test_color_formula():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    r = ColorReward(target=(0.2, 0.4, 0.6), s=0.5)
    m = x.mean(dim=(2, 3)) - torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    # float64 closed form: differences are rounding only (~1e-16); default float64 tolerance.
    torch.testing.assert_close(r(x), -(m ** 2).sum(1) / (2 * 0.25))
    assert ColorReward(target=(0.2, 0.4, 0.6), s=0.5)(torch.ones(1, 3, 2, 2) * torch.tensor(
        [0.2, 0.4, 0.6]).view(1, 3, 1, 1)).abs().max() < 1e-6  # at the target: log R = 0


@pytest.mark.parametrize("reward", [BrightnessReward(3.0), ColorReward()])
def test_smooth_gradcheck(reward):
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    # gradcheck in float64 (eps 1e-6, atol 1e-5): smooth closed forms pass far below that.
    assert torch.autograd.gradcheck(lambda v: reward(v, None), (x,))


def test_bad_inputs():
    with pytest.raises(RewardError, match=r"\(B, 3, H, W\)"):
        BrightnessReward()(torch.rand(2, 4, 4))
    with pytest.raises(RewardError, match="floating"):
        BrightnessReward()(torch.ones(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(RewardError, match="3 values"):
        ColorReward(target=(1.0, 0.0))
    with pytest.raises(RewardError, match="s must be > 0"):
        ColorReward(s=0.0)
