"""curves.png: which keys are loss terms (floats that are not rewards, norms, lags, timings;
counters are ints), non-finite values (null in distributed metrics) left out, and the PNG."""
import math

import pytest

from nablagfn.common.metrics.curves import loss_terms, series, write_curves

LOCAL = [{"update": u, "reward_mean": 0.5 + u, "reward_std": 0.1, "valid": 3, "skipped": 0, "optimizer_steps": 1,
          "forward": 0.1 / u, "backward": 0.2, "loss": 0.3, "grad_norm_lora": 1.0, "grad_norm_flow": 2.0,
          "seconds": 1.5, "seconds_sampling": 0.5, "method": "residual-nabla-db"} for u in (1, 2, 3)]
DISTRIBUTED = [{"update": u, "version": u, "trained_at_version": u - 1, "reward_mean": None if u == 2 else 1.0 * u,
                "reward_std": None, "approx_kl": 0.01 * u, "clipfrac": 0.0, "loss": None if u == 1 else 0.5,
                "lag_mean": 0.5, "lag_max": 1, "dead_lettered_total": 0, "seconds_wait": 0.1, "seconds_learn": 0.2,
                "traj_ids": ["a"], "sampled_versions": [0]} for u in (1, 2, 3)]


def test_loss_terms_are_the_float_objective_terms_loss_first():
    assert loss_terms(LOCAL) == ["loss", "backward", "forward"]
    assert loss_terms(DISTRIBUTED) == ["loss", "approx_kl", "clipfrac"]


def test_series_skips_missing_and_non_finite_values():
    assert series(DISTRIBUTED, "reward_mean") == ([1, 3], [1.0, 3.0])
    assert series(DISTRIBUTED, "loss") == ([2, 3], [0.5, 0.5])
    assert series([{"update": 1, "x": math.nan}, {"update": 2, "x": True}, {"update": 3}], "x") == ([], [])


@pytest.mark.parametrize("rows, evals", [(LOCAL, [{"update": 0, "reward_mean": 0.4}, {"update": 3, "reward_mean": 0.6}]),
                                         (DISTRIBUTED, None)])
def test_write_curves_writes_a_png(tmp_path, rows, evals):
    import matplotlib.image

    path = write_curves(tmp_path, rows, eval_rows=evals)
    assert path == tmp_path / "curves.png"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 1000  # 2 rows × 3 panels at 100 dpi


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert write_curves(tmp_path, []) is None and not (tmp_path / "curves.png").exists()
