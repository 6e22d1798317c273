"""Residual detailed balance, zeroth order (ALGORITHM.md §4): the residual balance on
log-probabilities with a learned scalar log-flow, no reward gradient.

For a kept transition x_t → x_t' of the MDP (ALGORITHM.md §1, Gaussian steps):

    Δ = log P_θ(x'|x) − η log P#(x'|x) + log F̃(x) − log F̃(x'),          L = mean Δ²

with log F̃(x_N) = β log R(x_N) at the terminal state (F̃(x_N) = R(x_N)^β) and, elsewhere,
log F̃(x_t) = guess(x_t) + f_ψ(x_t, t): a scalar network f_ψ on top of an optional zeroth-order
guess (β log R(x̂₀(x_t)), the reward *value* at a one-step prediction, or 0). At Δ ≡ 0 the policy is
the pretrained chain tilted by F̃: p_θ(x_N) ∝ p#(x_N)^η R(x_N)^β. Both log F̃ terms train f_ψ; the
policy term trains θ; log P#(x'|x) is a constant. Pure tensor functions.
"""
from __future__ import annotations

import torch


def log_flow_value(raw: torch.Tensor, guess: torch.Tensor | None = None) -> torch.Tensor:
    """log F̃ at a non-terminal state: guess + f_ψ (guess None = 0)."""
    return raw if guess is None else guess + raw


def next_log_flow(raw_next: torch.Tensor, guess_next: torch.Tensor | None, terminal_log_flow: torch.Tensor,
                  is_last: torch.Tensor) -> torch.Tensor:
    """log F̃(x'): β log R(x_N) where x' is terminal, guess + f_ψ elsewhere (per row (B,))."""
    learned = log_flow_value(raw_next, guess_next)
    return torch.where(is_last, terminal_log_flow.to(learned.dtype), learned)


def residual_db_residual(log_p_policy: torch.Tensor, log_p_pretrained: torch.Tensor, log_flow: torch.Tensor,
                         log_flow_next: torch.Tensor, pretrained_strength: float = 1.0) -> torch.Tensor:
    """Δ = log P_θ(x'|x) − η log P#(x'|x) + log F̃(x) − log F̃(x') per row (log P# detached)."""
    return log_p_policy - pretrained_strength * log_p_pretrained.detach() + log_flow - log_flow_next


def residual_db_loss(log_p_policy: torch.Tensor, log_p_pretrained: torch.Tensor, log_flow: torch.Tensor,
                     log_flow_next: torch.Tensor, pretrained_strength: float = 1.0) -> dict[str, torch.Tensor]:
    """L = mean Δ² over rows, with the mean |Δ| and the mean policy log-ratio as diagnostics."""
    delta = residual_db_residual(log_p_policy, log_p_pretrained, log_flow, log_flow_next, pretrained_strength)
    with torch.no_grad():
        log_ratio = (log_p_policy - log_p_pretrained).mean()
    return {"loss": delta.pow(2).mean(), "abs_residual": delta.detach().abs().mean(), "log_ratio": log_ratio}
