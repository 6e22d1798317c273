"""The end-of-run report a person reads, written into the run dir by both train modes.

`nablagfn train --mode local` (learner/local_trainer.py) calls `report_for_trainer` with its own
models; the distributed driver (nablagfn/driver.py) calls `write_run_report(run_dir, cfg)`, which
loads the pipeline in the driver process. Files (cfg.report, common/config.py:ReportConfig):

    curves.png                  training reward mean ± std, the evaluations (local mode), gradient
                                norms, policy lag or step time, one panel per loss term
                                (common/metrics/curves.py, from metrics.jsonl / eval.jsonl)
    reward_vs_diversity.png     mean log R against diversity of each checkpoint: the pretrained
    reward_vs_prior_drift.png   model (update 0), the kept LoRA snapshots (checkpoints/update_<n>/;
                                at most `max_checkpoints` points, evenly spaced) and the final lora/
    samples_pretrained.png      the pretrained and final policies' samples on the same prompts and
    samples_final.png           noise (rows: prompts, columns: samples), each captioned with its
                                prompt (shortened) and log R
    report.json                 the files, the training numbers and every plotted number

The checkpoints are sampled exactly as `nablagfn eval` samples them (nablagfn/evaluate.py:
`evaluate_run`): prompt i's noise from SeedSequence((report.seed, i)), `samples_per_prompt`
samples of each of the first `num_prompts` prompts of `report.prompts` ("heldout": the held-out
split of the training source, or the training source itself when it has none). Diversity is the
per-prompt mean pairwise cosine distance of image features: `features=auto` takes DreamSim when it
imports and loads, else CLIP on `features_model_path` / `reward.model_path` when that is a CLIP dir,
else `pixels` (the images at 32×32, needing no weights: a weak but always-available measure, named
in report.json). With `end_of_run=false` only curves.png and report.json are written. A failure of
the sampled part is recorded in report.json (`error`) and warned about, never raised: the trained
LoRA is already saved and the run succeeded.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nablagfn.common.config import EvalConfig, TrainConfig
from nablagfn.common.evaluation.features import build_feature_extractor, register_features

REPORT_FILE = "report.json"
PIXEL_SIZE = 32
CAPTION_CHARS = 28


class PixelFeatures(torch.nn.Module):
    """Images (B, C, H, W) in [0, 1] → their pixels at 32×32 (area-resized), scaled to [−1, 1] and
    flattened: features that need no weights (cosine distance then compares centred intensities)."""

    name = "pixels"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(PIXEL_SIZE, PIXEL_SIZE), mode="area")
        return (x * 2 - 1).flatten(1)


@register_features("pixels")
def pixel_features(model_path=None, device="cpu") -> PixelFeatures:
    """The `pixels` factory; `nablagfn eval --features nablagfn.run_report:pixel_features` uses it too."""
    return PixelFeatures()


def report_features(cfg: TrainConfig, device) -> tuple[object, list[str]]:
    """The report's feature extractor (module docstring: `auto` falls back) and why it fell back."""
    rc = cfg.report
    path = rc.features_model_path or cfg.reward.model_path
    if rc.features != "auto":
        return build_feature_extractor(rc.features, path, device), []
    notes = []
    for name, model_path in (("dreamsim", rc.features_model_path), ("clip", path)):
        if name == "clip" and not path:
            notes.append("clip: no features_model_path or reward.model_path")
            continue
        try:
            return build_feature_extractor(name, model_path, device), notes
        except Exception as exc:  # noqa: BLE001 - FeatureError, or a failed weight download / load
            notes.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
    return build_feature_extractor("pixels", None, device), notes


def pick_checkpoints(checkpoints: list, k: int) -> list:
    """At most k of `checkpoints` (sorted by update): the first and last, the rest evenly spaced."""
    if len(checkpoints) <= k:
        return list(checkpoints)
    idx = sorted({int(round(i)) for i in np.linspace(0, len(checkpoints) - 1, k)})
    return [checkpoints[i] for i in idx]


def shorten(prompt: str, n: int = CAPTION_CHARS) -> str:
    if not prompt:
        return "(unconditional)"
    return prompt if len(prompt) <= n else prompt[:n - 1] + "…"


def write_sample_grid(per_prompt: list, prompts: list[str], columns: int, path: Path, title: str) -> list[list[float]]:
    """A grid PNG (rows: prompts, columns: the first `columns` samples) captioned with the prompt
    and log R; returns the log R shown, per prompt."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(prompts)
    fig = Figure(figsize=(1.9 * columns, 2.1 * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    shown = []
    for i, (prompt, samples) in enumerate(zip(prompts, per_prompt)):
        shown.append([float(v) for v in samples.log_r[:columns]])
        for j in range(columns):
            ax = axes[i][j]
            ax.set_axis_off()
            img = samples.images[j].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{shorten(prompt)}\nlog R = {shown[-1][j]:.4g}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return shown


def training_numbers(rows: list[dict]) -> dict:
    """The training summary of metrics.jsonl's rows: updates, first/last/best reward, last loss terms."""
    from nablagfn.common.metrics.curves import loss_terms, series

    _, rewards = series(rows, "reward_mean")
    last = {t: series(rows, t)[1][-1] for t in loss_terms(rows) if series(rows, t)[1]}
    return {"updates": len(rows), "reward_first": rewards[0] if rewards else None,
            "reward_last": rewards[-1] if rewards else None, "reward_best": max(rewards) if rewards else None,
            "loss_terms_last": last}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sample_report(run_dir: Path, cfg: TrainConfig, models=None) -> tuple[dict, dict]:
    """Sample the run's checkpoints and write the plots and grids; (files, evaluation numbers)."""
    from nablagfn.common.evaluation import find_checkpoints, plot_pareto
    from nablagfn.common.evaluation.heldout import HeldoutError
    from nablagfn.evaluate import DEFAULT_METHOD, Run, RunModels, eval_prompts, evaluate_run, sample_checkpoint
    from nablagfn.learner.local_trainer import resolve_device

    rc = cfg.report
    run = Run(run_dir.name, run_dir, cfg, str(getattr(cfg, "method", DEFAULT_METHOD)))
    checkpoints = pick_checkpoints(find_checkpoints(run_dir, cfg.updates), rc.max_checkpoints)
    ecfg = EvalConfig(prompts=rc.prompts, max_prompts=rc.num_prompts, samples=rc.samples_per_prompt, seed=rc.seed,
                      features=rc.features, features_model_path=rc.features_model_path, out=str(run_dir),
                      batch_size=max(1, min(cfg.chunk_trajectories, rc.samples_per_prompt)), device=cfg.device,
                      progress=False)
    try:
        source, prompts, overlap = eval_prompts(ecfg, [run])
    except HeldoutError:  # no held-out split of this source: its own prompts (counted as overlap)
        ecfg.prompts = cfg.prompts.source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source, prompts, overlap = eval_prompts(ecfg, [run])
    if models is None:
        models = RunModels.load(cfg, resolve_device(cfg.device))
    extractor, notes = report_features(cfg, models.device)
    final = checkpoints[-1]
    reference = sample_checkpoint(models, checkpoints[0], prompts, ecfg, extractor, keep_images=True)
    rows, per_rows, kept = evaluate_run(run, models, checkpoints, prompts, ecfg, extractor, reference,
                                        keep_images=lambda c: c.path is None or c == final)
    files = {}
    name = getattr(extractor, "name", rc.features)
    files["reward_vs_diversity"] = plot_pareto(
        rows, "diversity", "reward_mean", run_dir / "reward_vs_diversity.png", maximize_x=True,
        xlabel=f"diversity: mean pairwise cosine distance of {name} features (higher is better)",
        ylabel="mean log R (higher is better)", title=f"{run.label}: reward vs diversity (label: update)")
    files["reward_vs_prior_drift"] = plot_pareto(
        rows, "prior_drift", "reward_mean", run_dir / "reward_vs_prior_drift.png", maximize_x=False,
        xlabel=f"prior drift: Fréchet distance of {name} features to the pretrained's (lower is better)",
        ylabel="mean log R (higher is better)", title=f"{run.label}: reward vs prior drift (label: update)")
    grids = {}
    for tag, ckpt in (("pretrained", checkpoints[0]), ("final", final)):
        path = run_dir / f"samples_{tag}.png"
        shown = write_sample_grid(kept[ckpt.update], prompts, rc.grid_columns, path,
                                  f"{tag} policy (update {ckpt.update}, {run.method}): the same noise in both sample grids")
        files[f"samples_{tag}"] = path
        grids[tag] = {"update": ckpt.update, "log_r": shown}
    evaluation = {"prompts_source": source, "prompts": prompts, "training_prompt_overlap": overlap,
                  "samples_per_prompt": rc.samples_per_prompt, "seed": rc.seed, "features": name,
                  "features_fallbacks": notes, "checkpoints": rows, "per_prompt": per_rows, "grids": grids}
    return files, evaluation


def write_run_report(run_dir: str | Path, cfg: TrainConfig, models=None, rows: Optional[list[dict]] = None,
                     sample: bool = True) -> dict:
    """Write the report (module docstring) into `run_dir`; returns what report.json holds.
    `models`: a RunModels of this run's config to sample with (None: loaded here); `rows`: the
    per-update metrics (None: metrics.jsonl); sample=False: curves and numbers only (a run that was
    asked to stop)."""
    run_dir = Path(run_dir)
    rows = _read_jsonl(run_dir / "metrics.jsonl") if rows is None else rows
    files: dict[str, Optional[Path]] = {"curves": None}
    from nablagfn.common.metrics.curves import write_curves

    files["curves"] = write_curves(run_dir, rows, eval_rows=_read_jsonl(run_dir / "eval.jsonl") or None)
    report: dict = {"run_dir": str(run_dir), "method": str(getattr(cfg, "method", "")),
                    "training": training_numbers(rows), "evaluation": None}
    if cfg.report.end_of_run and sample:
        try:
            with _threads(cfg.threads):
                more, report["evaluation"] = sample_report(run_dir, cfg, models)
            files.update(more)
        except Exception as exc:  # noqa: BLE001 - module docstring: the run itself succeeded
            report["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"{run_dir}: the end-of-run report's samples failed: {report['error']}", stacklevel=2)
    report["files"] = {k: Path(v).name for k, v in files.items() if v is not None}
    report = _finite_or_null(report)
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _finite_or_null(obj):
    """JSON without NaN/inf (strict parsers reject them): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def report_for_trainer(trainer) -> dict:
    """The report of a LocalTrainer's finished run, sampled with the trainer's own models."""
    from nablagfn.evaluate import RunModels

    return write_run_report(trainer.run_dir, trainer.cfg, RunModels.of_trainer(trainer))
