"""Pareto fronts of (objective₁, objective₂) points and their scatter plots (matplotlib's Agg canvas, PNG).

A point p dominates q when p is at least as good in both objectives and strictly better in one
("good" = larger for a maximised objective, smaller for a minimised one). The front is the set of
points no other point dominates; equal points do not dominate each other, so both stay. Points with
a NaN/inf coordinate are never on the front (and are not drawn).

The plots: reward (y, maximised) against diversity (x, maximised) or prior drift (x, minimised),
one colour per method, one marker per run, each point labelled with its update (0 = pretrained),
a thin line through each method's own front and a dashed black line through the front of all runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def pareto_front(points, maximize: Sequence[bool] = (True, True)) -> np.ndarray:
    """Indices of the non-dominated rows of points (n, k), sorted by the first objective."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(maximize):
        raise ValueError(f"points must be (n, {len(maximize)}), got shape {p.shape}")
    sign = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    g = p * sign  # larger is better in every column
    ok = np.isfinite(g).all(axis=1)
    front = []
    for i in np.flatnonzero(ok):
        others = g[ok]
        dominated = np.any(np.all(others >= g[i], axis=1) & np.any(others > g[i], axis=1))
        if not dominated:
            front.append(i)
    front = np.asarray(front, dtype=np.int64)
    return front[np.argsort(p[front, 0], kind="stable")]


def plot_pareto(rows: Sequence[dict], x: str, y: str, path: str | Path, *, maximize_x: bool,
                xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
                color_key: str = "method", marker_key: str = "run", label_key: str = "update") -> Path:
    """Scatter rows[x] against rows[y] (y maximised) with the fronts (module docstring); PNG at path."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_pareto: no rows to plot")
    for key in (x, y, color_key, marker_key):
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ValueError(f"plot_pareto: rows {missing[:3]} have no {key!r}")
    pts = np.array([[float(r[x]), float(r[y])] for r in rows])
    maximize = (maximize_x, True)
    methods = list(dict.fromkeys(str(r[color_key]) for r in rows))
    runs = list(dict.fromkeys(str(r[marker_key]) for r in rows))
    colors = matplotlib.colormaps["tab10"]
    markers = "osD^vP*Xh<>"

    fig = Figure(figsize=(6.4, 4.8), dpi=100)  # no pyplot: no global backend or figure state
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for mi, method in enumerate(methods):
        idx = np.array([i for i, r in enumerate(rows) if str(r[color_key]) == method])
        for run in runs:
            sel = [i for i in idx if str(rows[i][marker_key]) == run and np.isfinite(pts[i]).all()]
            if sel:
                ax.scatter(pts[sel, 0], pts[sel, 1], color=colors(mi % 10),
                           marker=markers[runs.index(run) % len(markers)], s=36, zorder=3,
                           label=f"{run} ({method})")
        front = idx[pareto_front(pts[idx], maximize)] if len(idx) else idx
        if len(front) > 1:
            ax.plot(pts[front, 0], pts[front, 1], color=colors(mi % 10), lw=1, alpha=0.7, zorder=2)
    overall = pareto_front(pts, maximize)
    if len(overall):
        ax.plot(pts[overall, 0], pts[overall, 1], "k--", lw=1.2, zorder=1, label="front (all runs)")
    for i, r in enumerate(rows):
        if label_key in r and np.isfinite(pts[i]).all():
            ax.annotate(str(r[label_key]), pts[i], textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel(xlabel or x + (" (higher is better)" if maximize_x else " (lower is better)"))
    ax.set_ylabel(ylabel or y + " (higher is better)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
