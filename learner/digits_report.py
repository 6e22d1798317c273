"""The digits report (`report.kind: digits`): the fine-tuned model against the pretrained one and
against the exact target, written to the run dir after training.

Reward log R(x) = log p(k | x) (rewards_service/rewards/digit_classifier.py), so with β = the
objective's reward scale the target is p#(x)·p(k|x)^β, drawn exactly by rejection sampling of
pretrained samples (learner/digits_metrics.rejection_keep). Three sample sets, all through the
training sampler (cfg.sampler) and the identity pixel decoder:

- before:    `report.reference_pool` samples of the pretrained model (adapter off);
- after:     `report.samples` samples of the fine-tuned model (LoRA on);
- reference: the `before` samples kept with probability p(k|x)^β (the exact target).

Each is classified by the reward's classifier; the report gives the share classified as k, the
class histogram, mean log R, the within-class-k diversity (mean pairwise distance of penultimate
features) and the prior drift (Fréchet distance of features to the pretrained samples'), and writes

    digits_before.png / digits_after.png / digits_reference.png   sample grids (class and p(k|x))
    digits_curves.png           reward mean and loss per update (from metrics.jsonl)
    digits_report.json          the summary table (also printed)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nablagfn.common.config import TrainConfig

from .digits_metrics import (class_histogram, class_share, predicted_labels, prior_drift, rejection_keep,
                             within_class_diversity)

GRID_IMAGES = 64
SAMPLE_BATCH = 256
SEED_OFFSETS = {"before": 1, "after": 2, "reject": 3}


class DigitsReportError(ValueError):
    """The run cannot be reported as a digits run (wrong reward, missing files)."""


@dataclass
class ScoredSamples:
    """Images (N, 3, H, W) in [0, 1], classifier probabilities (N, 10), features (N, D), log R (N,)."""

    images: torch.Tensor
    probs: torch.Tensor
    features: torch.Tensor
    log_r: torch.Tensor

    def take(self, mask: torch.Tensor) -> "ScoredSamples":
        return ScoredSamples(self.images[mask], self.probs[mask], self.features[mask], self.log_r[mask])


@torch.no_grad()
def sample_images(denoiser, schedule, cfg: TrainConfig, vae, n: int, adapter: bool, seed: int,
                  latent_shape=None, batch: int = SAMPLE_BATCH) -> torch.Tensor:
    """n final samples (policy if adapter, else pretrained) decoded to images in [0, 1]."""
    from nablagfn.common.trajectories import sample_trajectories
    from nablagfn.rewards_service.rewards import decode_latents

    sc = cfg.sampler
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        cond = denoiser.encode_prompts([""] * b)
        traj = sample_trajectories(denoiser, schedule, cond, None, 1.0, sc.kind, sc.eta, gen,
                                   adapter=adapter, latent_shape=latent_shape)
        out.append(decode_latents(traj.final.float(), vae).cpu())
    return torch.cat(out)


@torch.no_grad()
def score_images(reward, images: torch.Tensor, batch: int = SAMPLE_BATCH) -> ScoredSamples:
    """Classifier probabilities, penultimate features and log R of images (float32, on CPU)."""
    dev = next(reward.parameters()).device
    probs, feats, log_r = [], [], []
    for start in range(0, images.shape[0], batch):
        img = images[start:start + batch].to(dev)
        probs.append(reward.logits(img).softmax(dim=1).float().cpu())
        feats.append(reward.features(img).float().cpu())
        log_r.append(reward.log_reward(img).float().cpu())
    return ScoredSamples(images, torch.cat(probs), torch.cat(feats), torch.cat(log_r))


def set_stats(s: ScoredSamples, k: int, pretrained_features: torch.Tensor) -> dict:
    """The summary row of one sample set."""
    n = int(s.probs.shape[0])
    in_k = int((predicted_labels(s.probs) == k).sum()) if n else 0
    return {"n": n, "share_k": class_share(s.probs, k) if n else float("nan"),
            "n_classified_k": in_k,
            "mean_log_r": float(s.log_r.mean()) if n else float("nan"),
            "mean_p_k": float(s.probs[:, k].mean()) if n else float("nan"),
            "diversity_k": within_class_diversity(s.features, s.probs, k) if n else float("nan"),
            "prior_drift": prior_drift(s.features, pretrained_features) if n >= 2 else float("nan"),
            "class_histogram": class_histogram(s.probs) if n else []}


def save_digit_grid(s: ScoredSamples, k: int, path: Path, n: int = GRID_IMAGES) -> None:
    """A grid of the first n images captioned "<class> p=<p(k|x)>"."""
    from .local_trainer import save_grid

    n = min(n, s.images.shape[0])
    if n == 0:
        return
    labels = predicted_labels(s.probs[:n]).tolist()
    caps = [f"{c} p={float(p):.2f}" for c, p in zip(labels, s.probs[:n, k])]
    save_grid(s.images[:n], caps, path, min_side=64)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_curves(run_dir: Path, path: Path, reference_log_r: float | None = None) -> bool:
    """reward_mean (± std) and the loss per update from metrics.jsonl; False if there are none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        return False
    u = [r.get("update", i + 1) for i, r in enumerate(rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    mean = [r.get("reward_mean", math.nan) for r in rows]
    std = [r.get("reward_std", 0.0) for r in rows]
    ax1.plot(u, mean, label="policy samples")
    ax1.fill_between(u, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    if reference_log_r is not None and math.isfinite(reference_log_r):
        ax1.axhline(reference_log_r, color="k", ls="--", lw=1, label="exact target (rejection)")
    ax1.set_xlabel("update")
    ax1.set_ylabel("log R = log p(k|x)")
    ax1.legend(loc="lower right")
    for key in ("loss", "forward", "backward"):
        vals = [r.get(key) for r in rows]
        if any(v is not None and math.isfinite(v) and v > 0 for v in vals):
            ax2.plot(u, [v if v is not None and v > 0 else math.nan for v in vals], label=key)
    ax2.set_yscale("log")
    ax2.set_xlabel("update")
    ax2.set_ylabel("loss")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def format_table(summary: dict) -> str:
    """The summary as a fixed-width text table (one row per sample set)."""
    sets = summary["sets"]
    head = f"{'set':<10}{'n':>6}{'share k':>9}{'log R':>9}{'div k':>8}{'drift':>8}"
    lines = [f"digits report: k = {summary['digit']}, beta = {summary['beta']:g}", head]
    for name in ("before", "after", "reference"):
        r = sets[name]
        lines.append(f"{name:<10}{r['n']:>6}{r['share_k']:>9.3f}{r['mean_log_r']:>9.3f}"
                     f"{r['diversity_k']:>8.3f}{r['prior_drift']:>8.3f}")
    lines.append(f"diversity after / reference = {summary['diversity_ratio']:.3f}; "
                 f"bars {'met' if summary['bars_met'] else 'NOT met'} "
                 f"(share >= {summary['bars']['share_k']}, ratio >= {summary['bars']['diversity_ratio']})")
    return "\n".join(lines)


def digits_report(denoiser, schedule, cfg: TrainConfig, reward, vae, run_dir, latent_shape=None,
                  print_table: bool = True) -> dict:
    """Sample, score and write the report of a fine-tuned policy (the denoiser's LoRA) to run_dir."""
    from nablagfn.rewards_service.rewards import DigitClassifierReward

    if not isinstance(reward, DigitClassifierReward):
        raise DigitsReportError(f"report.kind=digits needs reward.name=digit_classifier, got "
                                f"{type(reward).__name__}")
    t0 = time.perf_counter()
    rc, k, beta = cfg.report, reward.digit, float(cfg.objective.reward_scale)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    common = dict(latent_shape=latent_shape)
    before = score_images(reward, sample_images(denoiser, schedule, cfg, vae, rc.reference_pool, False,
                                                rc.seed * 100 + SEED_OFFSETS["before"], **common))
    after = score_images(reward, sample_images(denoiser, schedule, cfg, vae, rc.samples, True,
                                               rc.seed * 100 + SEED_OFFSETS["after"], **common))
    keep = rejection_keep(before.log_r, beta, torch.Generator().manual_seed(rc.seed * 100 + SEED_OFFSETS["reject"]))
    reference = before.take(keep)
    sets = {name: set_stats(s, k, before.features) for name, s in
            (("before", before), ("after", after), ("reference", reference))}
    ratio = sets["after"]["diversity_k"] / sets["reference"]["diversity_k"]
    bars = {"share_k": 0.8, "diversity_ratio": 0.8}
    summary = {"digit": k, "beta": beta, "sets": sets, "diversity_ratio": ratio,
               "drift_after_to_reference": prior_drift(after.features, reference.features)
               if reference.probs.shape[0] >= 2 else float("nan"),
               "reference_acceptance": float(keep.double().mean()),
               "bars": bars,
               "bars_met": bool(sets["after"]["share_k"] >= bars["share_k"] and ratio >= bars["diversity_ratio"]),
               "sampler": {"kind": cfg.sampler.kind, "num_steps": cfg.sampler.num_steps, "eta": cfg.sampler.eta},
               "seed": rc.seed}
    save_digit_grid(before, k, run_dir / "digits_before.png")
    save_digit_grid(after, k, run_dir / "digits_after.png")
    save_digit_grid(reference, k, run_dir / "digits_reference.png")
    summary["curves"] = save_curves(run_dir, run_dir / "digits_curves.png", sets["reference"]["mean_log_r"])
    summary["report_seconds"] = time.perf_counter() - t0
    (run_dir / "digits_report.json").write_text(json.dumps(summary, indent=2))
    if print_table:
        print(format_table(summary), flush=True)
    return summary


def report_for_trainer(trainer) -> dict:
    """The report of a LocalTrainer at the end of its run (its LoRA policy, reward and sampler)."""
    return digits_report(trainer.denoiser, trainer.schedule, trainer.cfg, trainer.reward, trainer.vae,
                         trainer.run_dir, latent_shape=trainer.latent_shape)


def report_from_run_dir(run_dir, cfg: TrainConfig | None = None, device: str = "cpu") -> dict:
    """The report of a finished run from its files: config.yaml (unless cfg is given) and lora/.

    For drivers that train elsewhere (the distributed mode): loads the pretrained pipeline, adds
    the run's LoRA (diffusers format, `pipe.load_lora_weights`), builds the reward, and reports.
    """
    import yaml

    from nablagfn.common.config_io import build_config
    from nablagfn.common.models import Denoiser, load_pipeline
    from nablagfn.common.schedule import make_schedule
    from nablagfn.rewards_service.rewards import build_reward

    from .local_trainer import model_cache_dir, reward_vae

    run_dir = Path(run_dir)
    if cfg is None:
        path = run_dir / "config.yaml"
        if not path.is_file():
            raise DigitsReportError(f"run_dir: {path} is missing")
        cfg = build_config(TrainConfig, yaml.safe_load(path.read_text()))
    lora_dir = run_dir / "lora"
    if not lora_dir.is_dir():
        raise DigitsReportError(f"run_dir: {lora_dir} is missing (the run's final LoRA)")
    pipe = load_pipeline(cfg.model, cache_dir=model_cache_dir(cfg), device=device)
    pipe.load_lora_weights(str(lora_dir))
    den = Denoiser.from_pipeline(pipe)
    schedule = make_schedule(dict(pipe.scheduler.config), cfg.sampler.num_steps, cfg.sampler.kind)
    return digits_report(den, schedule, cfg, build_reward(cfg.reward, device), reward_vae(pipe), run_dir)
