"""Small networks of the GMM testbed: a UNet-style sinusoidal timestep embedding and MLPs.

The policy is ε#(x, t) + residual(x, t) with the residual's output zero-initialised (so training
starts at the pretrained model); g_φ is an MLP of the same shape, also starting at zero.
"""
from __future__ import annotations

import contextlib
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


class WeightEMA:
    """An exponential moving average of a module's parameters, swapped in for evaluation.

    Sampling from the averaged policy removes the update-to-update jitter of the mode weights
    (the flow and the policy chase each other; their average is steadier than any one iterate).
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, float(decay)
        self.shadow = [p.detach().clone() for p in module.parameters()]
        self.updates = 0

    def current_decay(self) -> float:
        """min(decay, (1 + u)/(10 + u)) after u updates: a short window while the policy moves fast
        early on (the usual EMA warm-up), the full one later."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.module.parameters()):
            s.lerp_(p.detach(), 1 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """Within the block the module holds the averaged weights; its own come back after."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.module.parameters()]
            for s, p in zip(self.shadow, self.module.parameters()):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for s, p in zip(saved, self.module.parameters()):
                    p.copy_(s)
