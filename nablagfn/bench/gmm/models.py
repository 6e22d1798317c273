"""Small networks of the GMM testbed: a UNet-style sinusoidal timestep embedding and MLPs.

The policy is ε#(x, t) + residual(x, t) with the residual's output zero-initialised (so training
starts at the pretrained model); g_φ is an MLP of the same shape, also starting at zero.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers' sinusoidal embedding (flip_sin_to_cos): nearby integer timesteps are close."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeMLP(nn.Module):
    """out = MLP([x, emb(t)]), last layer zero-initialised."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 3, emb_dim: int = 64, out_dim: int | None = None):
        super().__init__()
        self.emb_dim = emb_dim
        self.time = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        body = []
        for _ in range(layers - 1):
            body += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*body, nn.SiLU())
        self.out = nn.Linear(hidden, dim if out_dim is None else out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.time(timestep_embedding(timesteps, self.emb_dim))
        return self.out(self.body(h))
