"""Run outputs a person reads: `curves.png` in the run dir at the end of a run (both train modes), from
the per-update metrics (the rows of metrics.jsonl) and, in local mode, the evaluations (eval.jsonl).

Panels: the reward (training mean log R ± std per update; the fixed-noise evaluations as points when
given), the gradient norms, the policy lag (mean and max; distributed runs) or else the seconds per
update, then one panel per loss term. A loss term is any float-valued key that is not a reward,
gradient norm, lag, timing or counter (counters are ints), so every method's own terms appear
(∇-DB's forward/backward/terminal/regulariser/loss, DDPO's approx_kl/clipfrac, ...). Non-finite
values are logged as null by the distributed learner and are left out. matplotlib, Agg canvas.
"""
from __future__ import annotations

import math
from pathlib import Path

NOT_LOSS = {"update", "version", "trained_at_version", "reward_mean", "reward_std", "lag_mean", "lag_max",
            "dropped_stale_total", "duplicates_total", "dead_lettered_total", "traj_ids", "sampled_versions",
            "method"}
NOT_LOSS_PREFIXES = ("seconds", "grad_norm", "lag_", "reward_")


def _num(v) -> float | None:
    """v as a finite float, else None (bools, None, NaN, strings)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def loss_terms(rows: list[dict]) -> list[str]:
    """The loss-term keys of `rows` (module docstring), sorted with `loss` first."""
    terms = {k for r in rows for k, v in r.items()
             if isinstance(v, float) and k not in NOT_LOSS and not k.startswith(NOT_LOSS_PREFIXES)}
    return sorted(terms, key=lambda k: (k != "loss", k))


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(updates, values) of `key` over `rows`, skipping rows where it is missing or non-finite."""
    pts = [(r["update"], _num(r.get(key))) for r in rows]
    pts = [(u, v) for u, v in pts if v is not None]
    return ([u for u, _ in pts], [v for _, v in pts]) if pts else ([], [])


def write_curves(run_dir: str | Path, rows: list[dict], name: str = "curves.png",
                 eval_rows: list[dict] | None = None) -> Path | None:
    """Plot `rows` (one dict per update) to <run_dir>/<name>; None when there is nothing to plot."""
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    terms = loss_terms(rows)
    ncols = 3
    nrows = 1 + math.ceil(len(terms) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), dpi=100)  # no pyplot: no global figure state
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)

    ax = axes[0][0]
    u, m = series(rows, "reward_mean")
    if u:
        std = {r["update"]: _num(r.get("reward_std")) or 0.0 for r in rows}
        s = [std[x] for x in u]
        ax.plot(u, m, label="training mean log R")
        ax.fill_between(u, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.3, label="± std")
    if eval_rows:
        eu, em = series(eval_rows, "reward_mean")
        if eu:
            ax.plot(eu, em, "o--", ms=4, label="eval mean log R (fixed noise)")
    ax.set(title="reward", xlabel="update", ylabel="log R")
    ax.legend(fontsize=7)

    ax = axes[0][1]
    for key in sorted({k for r in rows for k in r if k.startswith("grad_norm")}):
        gu, gv = series(rows, key)
        if gu:
            ax.plot(gu, gv, label=key.removeprefix("grad_norm_") or key)
    ax.set(title="gradient norms", xlabel="update")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)

    ax = axes[0][2]
    if any("lag_max" in r for r in rows):
        for key, label in (("lag_mean", "mean"), ("lag_max", "max")):
            ax.plot(*series(rows, key), label=label)
        ax.set(title="policy lag (versions)", xlabel="update")
    else:
        ax.plot(*series(rows, "seconds"), label="update")
        ax.set(title="seconds per update", xlabel="update")
    ax.legend(fontsize=7)

    for i, term in enumerate(terms):
        ax = axes[1 + i // ncols][i % ncols]
        tu, tv = series(rows, term)
        ax.plot(tu, tv, marker="." if len(tu) < 20 else None)
        ax.set(title=f"loss term: {term}", xlabel="update")
        if tv and max(tv) > 0 and min(tv) > 0 and max(tv) / min(tv) > 100:
            ax.set_yscale("log")
    for j in range(len(terms), ncols * (nrows - 1)):
        axes[1 + j // ncols][j % ncols].set_visible(False)
    fig.tight_layout()
    path = Path(run_dir) / name
    fig.savefig(path, format="png")
    return path
