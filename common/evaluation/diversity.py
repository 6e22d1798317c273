"""Diversity: the mean pairwise distance between the embeddings of a set of samples.

For embeddings e₁ … e_n (n ≥ 2), over the n(n−1)/2 unordered pairs i < j,

    cosine:  D = mean_{i<j} (1 − ⟨e_i, e_j⟩ / (‖e_i‖ ‖e_j‖))   ∈ [0, 2]  (DreamSim's distance)
    l2:      D = mean_{i<j} ‖e_i − e_j‖₂

A zero embedding has no direction: cosine distance treats it as orthogonal to everything (distance
1, from F.normalize's ε), l2 is unaffected. `grouped_mean_pairwise_distance` is the per-prompt
diversity averaged over prompts (each prompt's samples form a group; every group needs n ≥ 2), so
differences between prompts do not count as diversity. All in float64.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

Metric = Literal["cosine", "l2"]
METRICS = ("cosine", "l2")


def pairwise_distances(emb, metric: Metric = "cosine") -> torch.Tensor:
    """(n, n) float64 matrix of distances between the rows of emb (n, D); zero diagonal."""
    e = torch.as_tensor(emb).detach().to(dtype=torch.float64, device="cpu")
    if e.ndim != 2:
        raise ValueError(f"embeddings must be (n, D), got shape {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError("embeddings contain NaN or inf")
    if metric == "cosine":
        u = F.normalize(e, dim=1)
        d = (1 - u @ u.T).clamp(0, 2)
    elif metric == "l2":
        d = (e[:, None, :] - e[None, :, :]).square().sum(-1).sqrt()
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return d.fill_diagonal_(0)


def mean_pairwise_distance(emb, metric: Metric = "cosine") -> torch.Tensor:
    """Mean distance over the pairs i < j of the rows of emb (n ≥ 2, D); a float64 scalar."""
    d = pairwise_distances(emb, metric)
    n = d.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 embeddings, got {n}")
    i, j = torch.triu_indices(n, n, offset=1)
    return d[i, j].mean()


def grouped_mean_pairwise_distance(emb, groups: Sequence, metric: Metric = "cosine") -> torch.Tensor:
    """The mean over groups of each group's mean pairwise distance (e.g. groups = prompt ids)."""
    e = torch.as_tensor(emb)
    keys = list(groups)
    if len(keys) != e.shape[0]:
        raise ValueError(f"groups: {len(keys)} labels for {e.shape[0]} embeddings")
    order: dict = {}
    for row, key in enumerate(keys):
        order.setdefault(key, []).append(row)
    small = [k for k, rows in order.items() if len(rows) < 2]
    if small:
        raise ValueError(f"groups: every group needs at least 2 samples; {small[:3]} have 1")
    per_group = [mean_pairwise_distance(e[rows], metric) for rows in order.values()]
    return torch.stack(per_group).mean()
