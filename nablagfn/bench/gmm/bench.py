"""`nablagfn bench gmm`: run one method on a spec and write samples.npy, summary.json, curve PNG."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nablagfn.common.config_io import to_dict

from . import exact
from .baselines import ALL_METHODS, make_baseline_trainer
from .flow_problem import make_problem
from .models import WeightEMA
from .run import GMMBenchConfig, GMMProblem, Trainer, exact_flow_shift, measure
from .spec import GMMSpec

METHODS = ALL_METHODS  # residual-nabla-db (run.Trainer) and the baselines (baselines.py)


def reference_figures(problem: GMMProblem, n: int, seed: int) -> dict:
    """Pretrained sampler, exact-flow sampler (the floor) and the exact target, on n samples each."""
    spec = problem.spec
    gen = torch.Generator().manual_seed(seed + 777)
    pre, _ = problem.sample(problem.pretrained_eps, n, gen)
    floor, _ = problem.sample(problem.pretrained_eps, n, gen, mean_shift=exact_flow_shift(problem))
    tgt = exact.sample_target(spec, 200_000, torch.Generator().manual_seed(seed + 31))
    return {"pretrained": measure(problem, pre[:, -1]), "exact_flow": measure(problem, floor[:, -1]),
            "target_mean_log_reward": float(exact.log_reward(spec, tgt).mean()),
            "target_weights": exact.target_weights(spec).tolist()}


def plot_curve(curve: list[dict], refs: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    u = [c["update"] for c in curve]
    ax1.plot(u, [c["tv"] for c in curve], "o-", label="policy")
    ax1.axhline(refs["pretrained"]["tv"], color="gray", ls="--", label="pretrained")
    ax1.axhline(refs["exact_flow"]["tv"], color="green", ls=":", label="exact-flow floor")
    ax1.set_xlabel("update"); ax1.set_ylabel("TV to target mode weights"); ax1.legend(); ax1.set_yscale("log")
    if curve and curve[-1]["flow_error"]:  # methods without a flow (DRaFT, ReFL, DDPO) report none
        for band in ("early", "mid", "late"):
            ax2.plot(u, [c["flow_error"][band] for c in curve], "o-", label=band)
        ax2.set_xlabel("update"); ax2.set_ylabel("flow error (ε units, RMS)"); ax2.legend(); ax2.set_yscale("log")
    else:
        ax2.plot(u, [c["mean_log_reward"] for c in curve], "o-", label="policy")
        ax2.axhline(refs["target_mean_log_reward"], color="green", ls=":", label="target")
        ax2.set_xlabel("update"); ax2.set_ylabel("mean log-reward"); ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_gmm_bench(spec: GMMSpec, cfg: GMMBenchConfig, out_dir: str | Path, progress: bool = True) -> dict:
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} is not one of {list(METHODS)}")
    if cfg.method == "residual-nabla-db" and cfg.objective.reward_scale != spec.beta:
        raise ValueError(f"objective.reward_scale={cfg.objective.reward_scale} differs from the spec's "
                         f"beta={spec.beta}: the target p#·R^β is the spec's (the CLI sets it from the spec)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    problem = make_problem(spec, cfg.sampler, cfg.model_family)
    trainer = Trainer(problem, cfg) if cfg.method == "residual-nabla-db" else make_baseline_trainer(problem, cfg)
    curve: list[dict] = []
    (out / "curve.jsonl").unlink(missing_ok=True)
    last_terms: dict = {}

    ema = WeightEMA(trainer.residual, cfg.policy_ema) if cfg.policy_ema > 0 else None
    averaged = ema.applied if ema is not None else contextlib.nullcontext

    def evaluate(u: int) -> None:
        """TV and mean log-reward of the policy that is reported (the weight average, when on)."""
        gen = torch.Generator().manual_seed(cfg.seed + 1000 + u)
        with averaged():
            s, _ = problem.sample(trainer.policy_eps, cfg.eval_samples, gen)
        m = measure(problem, s[:, -1])
        point = {"update": u, "tv": m["tv"], "mean_log_reward": m["mean_log_reward"]}
        if ema is not None:  # the online iterate beside it, for diagnostics
            s, _ = problem.sample(trainer.policy_eps, cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 1000 + u))
            online = measure(problem, s[:, -1])
            point |= {"tv_online": online["tv"], "mean_log_reward_online": online["mean_log_reward"]}
        curve.append(point | {"flow_error": trainer.flow_error(), "loss": dict(last_terms),
                              "seconds": time.perf_counter() - t0})
        with open(out / "curve.jsonl", "a") as fh:  # readable while the run goes on
            fh.write(json.dumps(curve[-1]) + "\n")

    t0 = time.perf_counter()
    bar = tqdm(range(cfg.updates), desc=f"{spec.name} {cfg.method}", disable=not progress, mininterval=1.0)
    for u in bar:
        if u % cfg.eval_every == 0:
            evaluate(u)
            bar.set_postfix(tv=f"{curve[-1]['tv']:.3f}")
        last_terms = trainer.update()
        if ema is not None:
            ema.update()
    train_seconds = time.perf_counter() - t0
    evaluate(cfg.updates)

    gen = torch.Generator().manual_seed(cfg.seed + 99)
    with averaged():
        final, _ = problem.sample(trainer.policy_eps, cfg.final_samples, gen)
    samples = final[:, -1].double()
    np.save(out / "samples.npy", samples.numpy())
    refs = reference_figures(problem, cfg.final_samples, cfg.seed)
    m = measure(problem, samples)
    summary = {
        "spec": spec.name, "method": cfg.method, "seed": cfg.seed,
        "tv": m["tv"], "empirical_weights": m["empirical_weights"], "target_weights": refs["target_weights"],
        "mean_log_reward": m["mean_log_reward"], "target_mean_log_reward": refs["target_mean_log_reward"],
        "log_reward_gap": m["mean_log_reward"] - refs["target_mean_log_reward"],
        "updates": cfg.updates, "wall_seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
        "pretrained": refs["pretrained"], "exact_flow": refs["exact_flow"],
        "flow_error": curve[-1]["flow_error"], "curve": curve, "config": to_dict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curve(curve, refs, out / "learning_curve.png", f"{spec.name}: {cfg.method}, seed {cfg.seed}")
    return summary
