"""The Gaussian-mixture benchmark spec (shared/benchmarks/README.md): load and validate.

Any dim, any number of modes and reward components. Errors name the offending field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch


class SpecError(ValueError):
    """The spec file is malformed; the message names the field."""


@dataclass(frozen=True)
class GMMSpec:
    means: torch.Tensor  # (K, d) data modes μ_k
    weights: torch.Tensor  # (K,) normalised w_k
    std: float  # s₀
    centers: torch.Tensor  # (J, d) reward bump centres c_j
    scales: torch.Tensor  # (J,) reward widths s_j
    reward_weights: torch.Tensor  # (J,) a_j
    beta: float
    name: str = "gmm"

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])


def _num_list(value, field: str, length: int | None = None) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise SpecError(f"{field}: expected a list of numbers, got {value!r}")
    if length is not None and len(value) != length:
        raise SpecError(f"{field}: expected {length} numbers, got {len(value)}")
    if not all(math.isfinite(v) for v in value):
        raise SpecError(f"{field}: values must be finite")
    return [float(v) for v in value]


def parse_spec(data: dict, name: str = "gmm") -> GMMSpec:
    if not isinstance(data, dict):
        raise SpecError("spec: top level must be a JSON object")
    for key in ("dim", "means", "weights", "std", "reward"):
        if key not in data:
            raise SpecError(f"{key}: missing required key")
    dim = data["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise SpecError(f"dim: expected a positive integer, got {dim!r}")
    if not isinstance(data["means"], list) or not data["means"]:
        raise SpecError("means: expected a non-empty list of points")
    means = [_num_list(m, f"means[{i}]", dim) for i, m in enumerate(data["means"])]
    weights = _num_list(data["weights"], "weights", len(means))
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SpecError("weights: must be >= 0 with a positive sum")
    std = data["std"]
    if not isinstance(std, (int, float)) or isinstance(std, bool) or not (std > 0 and math.isfinite(std)):
        raise SpecError(f"std: must be a positive number, got {std!r}")
    reward = data["reward"]
    if not isinstance(reward, dict) or "components" not in reward:
        raise SpecError("reward.components: missing required key")
    comps = reward["components"]
    if not isinstance(comps, list) or not comps:
        raise SpecError("reward.components: expected a non-empty list")
    centers, scales, amps = [], [], []
    for j, c in enumerate(comps):
        f = f"reward.components[{j}]"
        if not isinstance(c, dict):
            raise SpecError(f"{f}: expected an object")
        for key in ("center", "scale"):
            if key not in c:
                raise SpecError(f"{f}.{key}: missing required key")
        centers.append(_num_list(c["center"], f"{f}.center", dim))
        s = c["scale"]
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not (s > 0 and math.isfinite(s)):
            raise SpecError(f"{f}.scale: must be a positive number, got {s!r}")
        a = c.get("weight", 1.0)
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not (a > 0 and math.isfinite(a)):
            raise SpecError(f"{f}.weight: must be a positive number, got {a!r}")
        scales.append(float(s))
        amps.append(float(a))
    beta = data.get("beta", 1.0)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (beta > 0 and math.isfinite(beta)):
        raise SpecError(f"beta: must be a positive number, got {beta!r}")
    if len(comps) > 1 and abs(beta - 1.0) > 1e-12:
        raise SpecError(f"beta: must be 1 with several reward components (got {beta}); "
                        "p·R^β is a Gaussian mixture in closed form only then")
    w = torch.tensor(weights, dtype=torch.float64)
    return GMMSpec(means=torch.tensor(means, dtype=torch.float64), weights=w / w.sum(), std=float(std),
                   centers=torch.tensor(centers, dtype=torch.float64),
                   scales=torch.tensor(scales, dtype=torch.float64),
                   reward_weights=torch.tensor(amps, dtype=torch.float64), beta=float(beta), name=name)


def load_spec(path: str | Path) -> GMMSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec file {path} is not valid JSON: {exc}") from None
    return parse_spec(data, name=path.stem)
