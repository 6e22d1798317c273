"""Loading local state dicts (.pth / .pt / .bin / .safetensors) with errors that name the file."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .base import RewardError


def require_file(path: str | Path | None, what: str,
                 setting: str = "reward.weights_path") -> Path:
    """`path` as a Path, or RewardError naming it (and `what` it should hold) if it is no file."""
    if path is None or str(path) == "":
        raise RewardError(f"{what}: no file given (set {setting})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise RewardError(f"{what}: file not found: {p}")
    return p


def load_state_dict(path: str | Path | None, what: str = "reward") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint on CPU; a {'state_dict': ...} wrapper (Lightning) is unwrapped."""
    p = require_file(path, what)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RewardError(f"{what}: cannot read weights file {p}: {exc}") from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RewardError(f"{what}: {p} does not hold a state dict (got {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def strip_prefix(sd: dict[str, torch.Tensor], keep: str,
                 prefixes: Sequence[str] = ("", "module.", "model.", "mlp.")
                 ) -> dict[str, torch.Tensor]:
    """Keys starting with one of `prefixes` + `keep`, with that prefix removed (first match wins).

    E.g. keep="layers." maps `layers.0.weight`, `mlp.layers.0.weight` and
    `module.layers.0.weight` all to `layers.0.weight`.
    """
    for prefix in prefixes:
        out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix + keep)}
        if out:
            return out
    return {}
