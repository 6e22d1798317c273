"""log R and ∇_latent log R through a diffusers VAE decoder (AutoencoderKL), by autograd.

Decoding: z / scaling_factor (+ shift_factor when the config has one, SD3-style), then
`vae.decode(z).sample` in the VAE's dtype, which must be float32 (or float64 for checks): half
precision raises RewardError (bf16 reward gradients are badly wrong, ALGORITHM.md §2).

[-1, 1] -> [0, 1]: `to_image="clamp"` (default) is (x/2 + 1/2).clamp(0, 1), what the reference
pipelines save and score (DDPO, AlignProp, the Nabla-GFlowNet code); its gradient is zero for
decoded values outside [-1, 1], so saturated pixels give no signal. `to_image="linear"` drops the
clamp (smooth everywhere; the reward then sees the out-of-range values). Images reach the reward
at the decoded size: the CLIP-based rewards resize to their tower's size themselves (never an
error); analytic rewards take any size.

Rows whose log R or gradient is not finite are reported in `valid` (False) instead of raising:
their gradient rows are zeroed and their log R is returned as computed (NaN / inf), so callers
can skip and count them. Rows are independent (a reward's batch rows must not interact), and a
non-finite row is excluded from the backward pass so it cannot contaminate the others.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from .base import RewardError


class LatentRewardResult(NamedTuple):
    log_r: torch.Tensor  # (B,), detached
    grad: torch.Tensor  # (B, C, h, w), ∇_latent log R; zero rows where not valid
    valid: torch.Tensor  # (B,) bool: log R and its gradient are finite


def _vae_dtype(vae) -> torch.dtype:
    dtype = next(vae.parameters()).dtype
    if dtype not in (torch.float32, torch.float64):
        raise RewardError(f"the VAE must be float32 (or float64) to compute rewards, got {dtype}; "
                          "call vae.float() on the reward worker's copy")
    return dtype


def decode_latents(latents: torch.Tensor, vae, to_image: Literal["clamp", "linear"] = "clamp"):
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1] (see the module docstring)."""
    cfg = vae.config
    z = latents / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None)
    if shift is not None:
        z = z + shift
    x = vae.decode(z).sample / 2 + 0.5
    if to_image == "clamp":
        return x.clamp(0, 1)
    if to_image == "linear":
        return x
    raise RewardError(f"to_image must be 'clamp' or 'linear', got {to_image!r}")


def log_reward_and_grad(latents: torch.Tensor, vae, reward, prompts: Sequence[str] | None = None,
                        chunk: int = 4, to_image: Literal["clamp", "linear"] = "clamp"
                        ) -> LatentRewardResult:
    """log R(decode(latents)) and its gradient w.r.t. the latents, `chunk` rows per pass.

    Returns (log_r (B,), grad (B, C, h, w), valid (B,) bool), in the VAE's dtype.
    """
    if latents.ndim != 4:
        raise RewardError(f"latents must be (B, C, h, w), got {tuple(latents.shape)}")
    if prompts is not None and len(prompts) != latents.shape[0]:
        raise RewardError(f"{latents.shape[0]} latents but {len(prompts)} prompts")
    if chunk < 1:
        raise RewardError(f"chunk must be >= 1, got {chunk}")
    dtype = _vae_dtype(vae)
    device = next(vae.parameters()).device
    log_rs, grads = [], []
    with torch.enable_grad():
        for start in range(0, latents.shape[0], chunk):
            z = latents[start:start + chunk].detach().to(device=device, dtype=dtype)
            z.requires_grad_(True)
            p = None if prompts is None else list(prompts[start:start + chunk])
            log_r = reward(decode_latents(z, vae, to_image), p)
            if log_r.shape != (z.shape[0],):
                raise RewardError(f"reward returned shape {tuple(log_r.shape)}, "
                                  f"expected ({z.shape[0]},)")
            finite = torch.isfinite(log_r.detach())
            grad = None
            if log_r.requires_grad and bool(finite.any()):
                # Non-finite rows get weight 0 (and are masked to 0 so 0·NaN cannot appear).
                (grad,) = torch.autograd.grad(torch.where(finite, log_r, 0.0).sum(), z,
                                              allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(z)
            log_rs.append(log_r.detach().to(dtype))
            grads.append(grad.detach())
    log_r = torch.cat(log_rs)
    grad = torch.cat(grads)
    valid = torch.isfinite(log_r) & torch.isfinite(grad).flatten(1).all(dim=1)
    grad = torch.where(valid.view(-1, *([1] * (grad.ndim - 1))), grad, torch.zeros_like(grad))
    return LatentRewardResult(log_r, grad, valid)
