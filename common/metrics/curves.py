"""Run outputs a person reads: `curves.png` in the run dir at the end of a distributed run — the
reward (mean log R ± std per update), every logged loss term, and the policy lag (mean and max) —
from the learner's per-update metrics (the rows of metrics.jsonl). matplotlib with the Agg backend."""
from __future__ import annotations

from pathlib import Path

SKIP = {"update", "version", "trained_at_version", "reward_mean", "reward_std", "lag_mean", "lag_max",
        "dropped_stale_total", "duplicates_total", "dead_lettered_total", "seconds_wait", "seconds_learn",
        "seconds", "traj_ids", "sampled_versions"}


def write_curves(run_dir: str | Path, rows: list[dict], name: str = "curves.png") -> Path | None:
    """Plot `rows` (one dict per update) to <run_dir>/<name>; None when there is nothing to plot."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["update"] for r in rows]
    terms = sorted({k for r in rows for k, v in r.items()
                    if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    mean = [r.get("reward_mean") for r in rows]
    std = [r.get("reward_std") or 0.0 for r in rows]
    ok = [(u, m, s) for u, m, s in zip(x, mean, std) if m is not None]
    if ok:
        u, m, s = zip(*ok)
        axes[0].plot(u, m, label="mean log R")
        axes[0].fill_between(u, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.3, label="± std")
    axes[0].set(title="reward", xlabel="update", ylabel="log R")
    axes[0].legend()
    for t in terms:
        pts = [(u, r[t]) for u, r in zip(x, rows) if isinstance(r.get(t), (int, float))]
        axes[1].plot(*zip(*pts), label=t)
    axes[1].set(title="loss terms", xlabel="update")
    if any(abs(r.get(t) or 0) > 0 for r in rows for t in terms):
        axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].legend(fontsize=7, ncol=2)
    axes[2].plot(x, [r.get("lag_mean", 0) for r in rows], label="mean")
    axes[2].plot(x, [r.get("lag_max", 0) for r in rows], label="max")
    axes[2].set(title="policy lag (versions)", xlabel="update")
    axes[2].legend()
    fig.tight_layout()
    path = Path(run_dir) / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
