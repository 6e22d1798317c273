"""Reward lookup: `register_reward(name)`, and `build_reward(cfg, device)`.

A reward name resolves, in order, to: a built-in (registered in this package), an installed entry
point in group `nablagfn.rewards`, or a dotted path `package.module:callable`. What is named is a
factory `f(cfg: RewardConfig, device) -> reward`, or a class with a `from_config(cfg, device)`
classmethod. The reward is moved to `device` and, if a `RewardModel`, frozen (eval, no grads).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch

from nablagfn.common.dotted import load_dotted

from .base import RewardError, RewardModel

ENTRY_POINT_GROUP = "nablagfn.rewards"
_BUILTIN_MODULES = ("analytic", "aesthetic", "clip_score", "hpsv2_adapter", "image_reward_adapter",
                    "digit_classifier")
_REGISTRY: dict[str, Any] = {}


def register_reward(name: str) -> Callable[[Any], Any]:
    """Decorator: register a factory function or a class with `from_config` under `name`."""

    def deco(obj: Any) -> Any:
        if name in _REGISTRY and _REGISTRY[name] is not obj:
            raise RewardError(f"reward name {name!r} is already registered")
        _REGISTRY[name] = obj
        return obj

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_rewards() -> list[str]:
    """Built-in and installed (entry point) reward names."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def resolve_reward(name: str) -> Any:
    """The factory (or class) a reward name refers to; an unknown name lists the known ones."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        try:
            return eps[name].load()
        except Exception as exc:  # a broken plugin must name itself
            raise RewardError(f"entry point {name!r} ({eps[name].value}) failed to load: "
                              f"{exc}") from exc
    if ":" in name:
        return load_dotted(name, RewardError, "reward")
    raise RewardError(f"unknown reward {name!r}; known: {known_rewards()} "
                      f"(or a dotted path package.module:callable)")


def build_reward(cfg, device: str | torch.device = "cpu"):
    """Build the reward named by `cfg` (a RewardConfig) on `device`."""
    factory = resolve_reward(cfg.name)
    builder = getattr(factory, "from_config", None)
    reward = builder(cfg, device) if builder is not None else factory(cfg, device)
    if not callable(reward):
        raise RewardError(f"reward {cfg.name!r} built a non-callable {type(reward).__name__}")
    if isinstance(reward, torch.nn.Module):
        reward = reward.to(device)
    if isinstance(reward, RewardModel):
        reward.freeze()
    return reward
