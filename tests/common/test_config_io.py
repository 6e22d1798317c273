"""Config layering: defaults ← layers ← dotted overrides; partial sections keep their own defaults."""
from dataclasses import dataclass, field

import pytest

from nablagfn.bench.gmm.run import GMMBenchConfig
from nablagfn.common.config import OptimConfig, TrainConfig
from nablagfn.common.config_io import ConfigError, build_config


@dataclass
class _Outer:
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.0, lr=5e-4))
    n: int = 3


def test_a_partial_section_keeps_the_default_factory_values():
    cfg = build_config(_Outer, overrides=["optim.flow_lr=2e-3"])
    assert cfg.optim.flow_lr == 2e-3
    assert cfg.optim.weight_decay == 0.0 and cfg.optim.lr == 5e-4  # not OptimConfig's 1e-4 / 1e-3
    assert cfg.n == 3


def test_gmm_objective_override_keeps_the_bench_default_layout():
    cfg = build_config(GMMBenchConfig, {"objective": {"stein_lambda": 0.8}})
    assert cfg.objective.stein_lambda == 0.8
    assert cfg.objective.flow_potential and cfg.objective.value_loss_scale > 0


def test_layers_then_overrides_win_in_order_and_bad_keys_are_named():
    cfg = build_config(TrainConfig, {"updates": 5, "optim": {"lr": 1e-2}}, {"updates": 7}, overrides=["seed=3"])
    assert (cfg.updates, cfg.seed, cfg.optim.lr) == (7, 3, 1e-2)
    with pytest.raises(ConfigError, match="optim"):
        build_config(TrainConfig, overrides=["optim.nope=1"])
