"""DDPO (Black et al. 2023): PPO-clip on the per-step Gaussian log-probability ratio of the MDP.

Each kept transition x → x' of a sampled trajectory is one action with the trajectory's advantage A
(its reward, normalised per prompt). With π_θ(x'|x) = N(x'; μ_θ(x), σ²I) (common/samplers) and the
behaviour policy's log-probability recorded at sampling time (from ε_behaviour):

    r = exp(log π_θ(x'|x) − log π_old(x'|x)),
    L = mean over transitions of max(−A r, −A clip(r, 1 − ε, 1 + ε)),     A clipped to ±adv_clip_max.

The log-probability is the exact Gaussian log-density summed over all latent coordinates (not the
per-coordinate mean some implementations use), so the clip range ε applies to the true ratio.

Per-prompt normalisation: A_b = (R_b − mean_p)/(std_p + 1e-6) over the rewards of b's prompt p (this
batch's and, optionally, a history of earlier ones) when p has at least `min_count` of them, else over
the whole batch. Pure tensor functions.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from nablagfn.common.samplers import get_transition, log_prob

STD_EPS = 1e-6


def transition_log_prob(x: torch.Tensor, x_next: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
                        alpha_bar_next: torch.Tensor, sampler: str = "ddim", eta: float = 1.0) -> torch.Tensor:
    """log N(x'; μ(x, ε), σ²I) per row (B,) for the step whose model output is ε (per-row ᾱ (B,))."""
    st = get_transition(sampler)(x, eps, alpha_bar_t, alpha_bar_next, eta)
    return log_prob(x_next, st.mean, st.std)


def per_prompt_advantages(rewards: torch.Tensor, prompts: Sequence[Hashable], min_count: int = 1,
                          history: Mapping[Hashable, Sequence[float]] | None = None) -> torch.Tensor:
    """(R − mean)/(std + 1e-6) with each prompt's statistics (population std), or the batch's where the
    prompt has fewer than `min_count` rewards (this batch's plus `history[prompt]`)."""
    if rewards.dim() != 1 or rewards.shape[0] != len(prompts):
        raise ValueError(f"rewards must be (B,) with one prompt each: got {tuple(rewards.shape)} "
                         f"and {len(prompts)} prompts")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    r = rewards.detach()
    out = (r - r.mean()) / (r.std(unbiased=False) + STD_EPS)
    groups: dict[Hashable, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for p, rows in groups.items():
        past = torch.as_tensor(list(history.get(p, ())) if history else [], dtype=r.dtype, device=r.device)
        vals = torch.cat([past, r[rows]])
        if vals.numel() >= min_count:
            out[rows] = (r[rows] - vals.mean()) / (vals.std(unbiased=False) + STD_EPS)
    return out


def ppo_clip_loss(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
                  clip: float, adv_clip_max: float = float("inf")) -> dict[str, torch.Tensor]:
    """The PPO-clip loss over transitions (rows) and diagnostics: approx_kl = ½ mean (log r)², clipfrac."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    adv = advantages.detach().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob_new - log_prob_old.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((ratio - 1).abs() > clip).to(ratio.dtype).mean()
    return {"loss": loss, "approx_kl": approx_kl, "clipfrac": clipfrac}
