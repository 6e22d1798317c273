"""Which transitions of each trajectory are kept for training, decided at sampling time.

K = round(timestep_fraction · N) transitions per trajectory. Low-variance (stratified) subsampling
draws one step uniformly in each of K equal-width blocks instead of K without replacement, so every
noise band is covered in every trajectory. With `keep_last` the last transition (the anchor,
whose next state is the terminal one with the known flow β∇log R) is always one of the K.
"""
from __future__ import annotations

import math

import torch


def num_kept(num_steps: int, fraction: float, keep_last: bool) -> int:
    k = max(1, int(round(fraction * num_steps)))
    return max(k, 2) if keep_last and num_steps > 1 and fraction * num_steps > 1 else k


def subsample_steps(batch: int, num_steps: int, fraction: float, low_variance: bool = True,
                    keep_last: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, K) sorted step indices in [0, num_steps)."""
    K = num_kept(num_steps, fraction, keep_last)
    pool = num_steps - 1 if keep_last else num_steps
    draw = K - 1 if keep_last else K
    if draw > pool:
        raise ValueError(f"cannot keep {K} of {num_steps} transitions")
    if draw == 0:
        picks = torch.empty(batch, 0, dtype=torch.long)
    elif low_variance:
        edges = torch.linspace(0, pool, draw + 1, dtype=torch.float64)
        u = torch.rand(batch, draw, generator=generator, dtype=torch.float64)
        picks = (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp_(0, pool - 1)
    else:
        picks = torch.argsort(torch.rand(batch, pool, generator=generator), dim=1)[:, :draw]
    if keep_last:
        picks = torch.cat([picks, torch.full((batch, 1), num_steps - 1, dtype=torch.long)], dim=1)
    return picks.sort(dim=1).values


def first_stop_step(num_steps: int, min_step_fraction: float) -> int:
    """The earliest stop state ⌊f·N⌋, at most N−1."""
    if not 0 <= min_step_fraction < 1:
        raise ValueError(f"min_step_fraction must be in [0, 1), got {min_step_fraction}")
    return min(num_steps - 1, int(math.floor(min_step_fraction * num_steps)))
