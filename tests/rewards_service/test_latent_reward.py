"""log R and ∇_latent log R through a tiny random AutoencoderKL, checked by finite differences."""
import pytest
import torch
from diffusers import AutoencoderKL

from nablagfn.rewards_service.rewards import (ColorReward, RewardError, decode_latents,
                                              log_reward_and_grad)


def tiny_vae(**extra):
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, **extra).eval()


@pytest.fixture(scope="module")
def vae64():
    return tiny_vae().double()


def _latents(b=4, dtype=torch.float64, seed=1):
    return torch.randn(b, 4, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.5


@pytest.mark.parametrize("to_image", ["linear", "clamp"])
def test_latent_gradient_matches_finite_differences(vae64, to_image):
    reward = ColorReward(target=(0.6, 0.4, 0.5), s=0.2)
    z = _latents()
    res = log_reward_and_grad(z, vae64, reward, chunk=3, to_image=to_image)  # chunks of 3 + 1
    assert res.log_r.shape == (4,) and res.grad.shape == z.shape and res.valid.all()
    with torch.no_grad():
        x = decode_latents(z, vae64, "linear")
        torch.testing.assert_close(res.log_r, reward(decode_latents(z, vae64, to_image), None))
        if to_image == "clamp":
            # FD across a kink is meaningless: require every pixel to be >= 1e-4 away from 0 and 1
            # (the step below moves pixels by ~1e-6), and some pixels to be clamped (zero gradient).
            assert ((x - 0).abs().min() > 1e-4) and ((x - 1).abs().min() > 1e-4)
            assert ((x < 0) | (x > 1)).any()
    eps = 1e-6
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            f = lambda zz: reward(decode_latents(zz, vae64, to_image), None)  # noqa: E731
            fd = (f(z + eps * v) - f(z - eps * v)) / (2 * eps)  # per row: rows are independent
        ad = (res.grad * v).flatten(1).sum(1)
        # float64 central differences: truncation O(eps^2 |f'''|) ~1e-12 and rounding
        # ~1e-16 |f| / eps ~1e-10 (|log R| ~ 0.1, measured |ad - fd| ~ 1e-10); 1e-6 relative
        # + 1e-8 absolute is above both and far below the error of a wrong scaling, shift or
        # chain rule (O(|ad|) ~ 1e-3 .. 1e-1 here).
        torch.testing.assert_close(ad, fd, rtol=1e-6, atol=1e-8)


def test_scaling_and_shift_factor():
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.1).double()
    z = _latents(2)
    with torch.no_grad():
        ref = (vae.decode(z / 0.5 + 0.1).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(decode_latents(z, vae), ref, rtol=0, atol=0)


class NaNRow(torch.nn.Module):
    """Wraps a reward: row `row` gets a NaN log R, or (grad_only) a finite log R, NaN gradient."""

    def __init__(self, base, row, grad_only=False):
        super().__init__()
        self.base, self.row, self.grad_only = base, row, grad_only

    def forward(self, images, prompts):
        log_r = self.base(images, prompts).clone()
        if self.grad_only:
            d = images[self.row, 0, 0, 0] - images[self.row, 0, 0, 0].detach()  # value 0
            log_r[self.row] = log_r[self.row] + 0 * torch.sqrt(d)  # value +0, gradient 0*inf = NaN
        else:
            log_r[self.row] = log_r[self.row] + torch.log(-images[self.row].mean())  # NaN
        return log_r


@pytest.mark.parametrize("grad_only", [False, True])
def test_non_finite_row_is_flagged_others_unaffected(vae64, grad_only):
    base = ColorReward()
    z = _latents()
    clean = log_reward_and_grad(z, vae64, base, chunk=4)
    res = log_reward_and_grad(z, vae64, NaNRow(base, 1, grad_only), chunk=4)  # one shared chunk
    assert res.valid.tolist() == [True, False, True, True]
    assert torch.isnan(res.log_r[1]) != grad_only  # NaN log R reported as computed
    assert torch.equal(res.grad[1], torch.zeros_like(res.grad[1]))
    keep = torch.tensor([0, 2, 3])
    # the other rows go through the same float64 ops: equal to rounding (default float64 tol).
    torch.testing.assert_close(res.log_r[keep], clean.log_r[keep])
    torch.testing.assert_close(res.grad[keep], clean.grad[keep])


def test_input_errors(vae64):
    with pytest.raises(RewardError, match="float32"):
        log_reward_and_grad(_latents(1, torch.float16), tiny_vae().half(), ColorReward())
    with pytest.raises(RewardError, match="2 latents but 1 prompts"):
        log_reward_and_grad(_latents(2), vae64, ColorReward(), prompts=["a"])
    with pytest.raises(RewardError, match="to_image"):
        log_reward_and_grad(_latents(1), vae64, ColorReward(), to_image="soft")


def test_float32_path_and_no_grad_context():
    vae = tiny_vae()
    with torch.no_grad():  # callers may hold no_grad: the gradient is still computed
        res = log_reward_and_grad(_latents(2, torch.float32), vae, ColorReward(), chunk=1)
    assert res.log_r.dtype == torch.float32 and res.valid.all() and res.grad.abs().max() > 0
    assert all(p.grad is None for p in vae.parameters())  # no parameter gradients accumulated


def test_model_reward_through_the_vae(clip_dir, tmp_path):
    """Aesthetic reward built from local files, fed 8x8 decoded images (resized to its 32x32)."""
    from reward_fixtures import public_laion_head_state

    from nablagfn.common.config import RewardConfig
    from nablagfn.rewards_service.rewards import build_reward

    torch.save(public_laion_head_state(16), tmp_path / "head.pth")
    cfg = RewardConfig(name="aesthetic", model_path=str(clip_dir),
                       weights_path=str(tmp_path / "head.pth"), chunk_size=2)
    reward = build_reward(cfg)
    res = log_reward_and_grad(_latents(3, torch.float32), tiny_vae(), reward, ["a"] * 3,
                              chunk=cfg.chunk_size)
    assert res.valid.all() and res.log_r.dtype == torch.float32
    assert torch.isfinite(res.grad).all() and res.grad.flatten(1).norm(dim=1).min() > 0
