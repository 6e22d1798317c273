"""Pareto fronts (common/evaluation/pareto.py) on hand-worked points, and the PNG plot."""
import math

import numpy as np
import pytest
from PIL import Image

from nablagfn.common.evaluation import pareto_front, plot_pareto

# (x, y): both maximised. Dominated: (1, 1) by (2, 2); (0, 2.5) by (2, 3)... worked out below.
POINTS = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 0.5], [0.5, 3.0], [1.5, 2.5], [2.0, 2.0], [0.0, 2.5]])


def test_front_both_maximised():
    # (2,2) twice: equal points do not dominate each other; (1,1) < (2,2); (0,2.5) < (0.5,3).
    front = pareto_front(POINTS, (True, True))
    assert sorted(front.tolist()) == [1, 2, 3, 4, 5]
    assert list(POINTS[front, 0]) == sorted(POINTS[front, 0])  # sorted by the first objective


def test_front_with_a_minimised_objective():
    # x minimised (prior drift), y maximised (reward): (0, 2.5) and (0.5, 3) are the front.
    assert sorted(pareto_front(POINTS, (False, True)).tolist()) == [3, 6]


def test_non_finite_points_are_never_on_the_front():
    pts = np.vstack([POINTS, [[math.nan, 10.0], [10.0, math.inf]]])
    assert sorted(pareto_front(pts, (True, True)).tolist()) == [1, 2, 3, 4, 5]


def test_bad_shape_is_an_error():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        pareto_front(np.zeros((3, 3)), (True, True))


def test_plot_writes_a_png_with_every_method(tmp_path):
    rows = [{"run": r, "method": m, "update": u, "diversity": d, "reward_mean": y}
            for r, m, u, d, y in [("a", "nabla", 0, 0.3, 1.0), ("a", "nabla", 1, 0.25, 1.5),
                                  ("b", "draft", 0, 0.3, 1.0), ("b", "draft", 1, 0.1, 2.0),
                                  ("b", "draft", 2, math.nan, 2.5)]]
    path = plot_pareto(rows, "diversity", "reward_mean", tmp_path / "sub" / "p.png", maximize_x=True,
                       title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (640, 480)
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # something was drawn, not a blank canvas
    with pytest.raises(ValueError, match="no 'reward_mean'"):
        plot_pareto([{"run": "a", "method": "m", "diversity": 1.0}], "diversity", "reward_mean",
                    tmp_path / "x.png", maximize_x=True)
