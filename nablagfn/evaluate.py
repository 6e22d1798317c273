"""`nablagfn eval RUN_DIR [RUN_DIR ...]`: every checkpoint of every run on held-out prompts, fixed seeds.

Per run: its config.yaml (the resolved TrainConfig) gives the pipeline (`load_pipeline(cfg.model)`
plus `add_lora(cfg.lora)`, the training code path), the sampling MDP (`sample_trajectories` with
cfg.sampler) and the reward (`build_reward(cfg.reward)`, images by `decode_latents` through the
float32 VAE). Its checkpoints (common/evaluation/checkpoints.py) are update 0 = the pretrained
model (adapter disabled), checkpoints/update_<n>/, and lora/ (the final update). For every
checkpoint and every evaluation prompt i, `samples` samples are drawn from a torch generator seeded
with SeedSequence((seed, i)) in batches of `batch_size`: the same noise for every checkpoint and
run. Each sample is scored (log R) and embedded (common/evaluation/features.py). Per checkpoint:

    reward_mean, reward_std  over all prompts × samples of the finite log R (non_finite counts the rest)
    diversity                per-prompt mean pairwise cosine distance of the embeddings, averaged
    diversity_l2             the same with the L2 distance
    prior_drift              per-prompt Fréchet distance (frechet_distance_features) between the
                             checkpoint's embeddings and the reference's, averaged over prompts; the
                             reference is the run's pretrained model (adapter disabled) on the same
                             prompts and noise, so the pretrained row's drift is 0 up to round-off

Prompts: `prompts=heldout` (default) takes the held-out split of the runs' training source
(common/evaluation/heldout.py: e.g. 16 animals that DDPO's 45 training animals do not contain); all
runs must then share one training source. Any built-in name or text file can be given instead; its
overlap with the training prompts is counted in eval.json (and warned about).

Writes to `out`: comparison.csv (one row per run × checkpoint: run, method, update, reward_mean,
reward_std, diversity, prior_drift, then diversity_l2, non_finite, samples, checkpoint),
per_prompt.csv, eval.json (settings, prompts, feature extractor), pareto_reward_diversity.png and
pareto_reward_prior_drift.png (common/evaluation/pareto.py). `evaluate_run` is one run's part
(the end-of-run report, nablagfn/run_report.py, calls it with the trainer's own models).
"""
from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from nablagfn.common.config import EvalConfig, TrainConfig
from nablagfn.common.config_io import ConfigError, build_config, load_yaml, to_dict
from nablagfn.common.evaluation import (Checkpoint, CheckpointError, extract_features, find_checkpoints,
                                        frechet_distance_features, grouped_mean_pairwise_distance,
                                        heldout_prompts, plot_pareto, read_lora_dir)

COLUMNS = ("run", "method", "update", "reward_mean", "reward_std", "diversity", "prior_drift",
           "diversity_l2", "non_finite", "samples", "checkpoint")
PER_PROMPT_COLUMNS = ("run", "method", "update", "prompt_index", "prompt", "reward_mean", "diversity",
                      "prior_drift")
DEFAULT_METHOD = "residual-nabla-db"  # runs written before TrainConfig had a `method`


@dataclass
class Run:
    label: str
    run_dir: Path
    cfg: TrainConfig
    method: str


def load_run(run_dir: str | Path) -> Run:
    """A run dir's resolved TrainConfig (config.yaml) and method; errors name the path."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml (not a `nablagfn train` run dir)")
    try:
        cfg = build_config(TrainConfig, load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return Run(run_dir.name, run_dir, cfg, str(getattr(cfg, "method", DEFAULT_METHOD)))


def unique_labels(runs: list[Run]) -> None:
    """Run labels are folder names, made unique with their parent (then an index) on a clash."""
    for r in runs:
        if sum(o.label == r.label for o in runs) > 1:
            r.label = f"{r.run_dir.parent.name}/{r.run_dir.name}"
    seen: dict[str, int] = {}
    for r in runs:
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label}#{seen[r.label]}"
        else:
            seen[r.label] = 0


def eval_prompts(ecfg: EvalConfig, runs: list[Run]) -> tuple[str, list[str], int]:
    """(source description, prompts, how many of them the runs trained on)."""
    from nablagfn.common.config import PromptConfig
    from nablagfn.common.prompts import build_prompt_source

    train_sources = {r.cfg.prompts.source for r in runs}
    if ecfg.prompts == "heldout":
        if len(train_sources) > 1:
            raise ConfigError(f"prompts: the runs trained on different prompt sources {sorted(train_sources)}: "
                              "no common held-out split; give --prompts SOURCE")
        train = next(iter(train_sources))
        source, prompts = f"heldout:{train}", list(heldout_prompts(train))
    elif ecfg.prompts.startswith("heldout:"):
        source, prompts = ecfg.prompts, list(heldout_prompts(ecfg.prompts.split(":", 1)[1]))
    else:
        src = build_prompt_source(PromptConfig(source=ecfg.prompts))
        source, prompts = src.name, list(src.prompts)
    if ecfg.max_prompts:
        prompts = prompts[:ecfg.max_prompts]
    trained_on: set[str] = set()
    for s in train_sources:
        trained_on |= set(build_prompt_source(PromptConfig(source=s)).prompts)
    overlap = sum(p in trained_on for p in prompts)
    if overlap and source != "heldout:none":
        warnings.warn(f"eval prompts {source!r}: {overlap} of {len(prompts)} were training prompts",
                      stacklevel=2)
    return source, prompts, overlap


def prompt_seed(seed: int, index: int) -> int:
    """The noise seed of evaluation prompt `index` (independent streams per prompt)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class PromptSamples(NamedTuple):
    """One prompt's samples: log R (n,), features (n, D), and the images (n, 3, H, W) on the CPU
    when asked for (the run report's grids), else None."""

    log_r: torch.Tensor
    features: torch.Tensor
    images: Optional[torch.Tensor] = None


@dataclass
class RunModels:
    """The pipeline + LoRA adapter, MDP schedule, reward and VAE of one run config, for sampling.
    `load` builds them from a config; a trainer that holds them already passes its own (`of_trainer`)."""

    cfg: TrainConfig
    device: torch.device
    pipe: Any
    denoiser: Any
    schedule: Any
    latent_shape: Any
    uncond: torch.Tensor
    reward: Any
    vae: Any

    @classmethod
    def load(cls, cfg: TrainConfig, device: torch.device) -> "RunModels":
        from nablagfn.common.models import Denoiser, add_lora, load_pipeline
        from nablagfn.common.schedule import make_schedule
        from nablagfn.common.trajectories import pipeline_latent_shape
        from nablagfn.learner.local_trainer import model_cache_dir, reward_vae
        from nablagfn.rewards_service.rewards import build_reward

        pipe = load_pipeline(cfg.model, cache_dir=model_cache_dir(cfg), device=device)
        add_lora(pipe.unet, cfg.lora)
        denoiser = Denoiser.from_pipeline(pipe)
        schedule = make_schedule(dict(pipe.scheduler.config), cfg.sampler.num_steps, cfg.sampler.kind)
        # the latent size exactly as the trainer computes it (learner/local_trainer.py)
        return cls(cfg, device, pipe, denoiser, schedule, pipeline_latent_shape(pipe, denoiser, cfg.model.resolution),
                   denoiser.encode_prompts([""]), build_reward(cfg.reward, device), reward_vae(pipe))

    @classmethod
    def of_trainer(cls, trainer) -> "RunModels":
        """The models a LocalTrainer holds (no second copy of the pipeline in memory)."""
        return cls(trainer.cfg, trainer.device, trainer.pipe, trainer.denoiser, trainer.schedule,
                   trainer.latent_shape, trainer.uncond, trainer.reward, trainer.vae)

    def load_checkpoint(self, ckpt) -> None:
        """Put checkpoint `ckpt`'s LoRA into the adapter (the pretrained one needs none)."""
        from nablagfn.common.models import load_lora_state_dict

        if ckpt.path is not None:
            try:
                load_lora_state_dict(self.pipe.unet, read_lora_dir(ckpt.path))
            except ValueError as exc:
                raise CheckpointError(f"{ckpt.path}: {exc}") from None

    @torch.no_grad()
    def sample_prompt(self, prompt: str, n: int, seed: int, batch_size: int, adapter: bool,
                      extractor, keep_images: bool = False) -> PromptSamples:
        """n samples of `prompt` from a generator seeded `seed`: log R, features (and images)."""
        from nablagfn.common.trajectories import sample_trajectories
        from nablagfn.rewards_service.rewards import decode_latents

        sc, chunk = self.cfg.sampler, self.cfg.reward.chunk_size
        gen = torch.Generator().manual_seed(seed)
        cond = self.denoiser.encode_prompts([prompt])
        log_r, feats, kept = [], [], []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            traj = sample_trajectories(self.denoiser, self.schedule, cond.expand(b, *cond.shape[1:]),
                                       self.uncond, sc.guidance_scale, sc.kind, sc.eta, gen,
                                       adapter=adapter, latent_shape=self.latent_shape)
            for c in range(0, b, chunk):
                images = decode_latents(traj.final[c:c + chunk].float(), self.vae)
                log_r.append(self.reward(images, [prompt] * images.shape[0]).detach().float().cpu())
                feats.append(extract_features(extractor, images, batch_size))
                if keep_images:
                    kept.append(images.detach().float().cpu())
        return PromptSamples(torch.cat(log_r), torch.cat(feats), torch.cat(kept) if keep_images else None)


def sample_checkpoint(models: RunModels, ckpt, prompts: list[str], ecfg: EvalConfig, extractor,
                      keep_images: bool = False) -> list[PromptSamples]:
    """The samples of every prompt of checkpoint `ckpt` (update 0: adapter disabled)."""
    models.load_checkpoint(ckpt)
    return [models.sample_prompt(p, ecfg.samples, prompt_seed(ecfg.seed, i), ecfg.batch_size,
                                 adapter=ckpt.path is not None, extractor=extractor, keep_images=keep_images)
            for i, p in enumerate(prompts)]


def checkpoint_metrics(per_prompt: list[PromptSamples], reference: list[PromptSamples]) -> tuple[dict, list[dict]]:
    """The comparison-row numbers of one checkpoint and its per-prompt rows (module docstring)."""
    log_r = torch.cat([s.log_r for s in per_prompt])
    finite = log_r[torch.isfinite(log_r)]
    feats = torch.cat([s.features for s in per_prompt])
    groups = [i for i, s in enumerate(per_prompt) for _ in range(s.log_r.shape[0])]
    drifts = [float(frechet_distance_features(s.features, ref.features)) for s, ref in zip(per_prompt, reference)]
    row = {"reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
           "reward_std": float(finite.std(unbiased=False)) if finite.numel() else float("nan"),
           "diversity": float(grouped_mean_pairwise_distance(feats, groups, "cosine")),
           "prior_drift": float(np.mean(drifts)),
           "diversity_l2": float(grouped_mean_pairwise_distance(feats, groups, "l2")),
           "non_finite": int(log_r.numel() - finite.numel()), "samples": int(log_r.numel())}
    per = []
    for i, ((lr, f, _), drift) in enumerate(zip(per_prompt, drifts)):
        ok = lr[torch.isfinite(lr)]
        per.append({"prompt_index": i, "reward_mean": float(ok.mean()) if ok.numel() else float("nan"),
                    "diversity": float(grouped_mean_pairwise_distance(f, [0] * f.shape[0], "cosine")),
                    "prior_drift": drift})
    return row, per


def evaluate_run(run: Run, models: RunModels, checkpoints: list, prompts: list[str], ecfg: EvalConfig,
                 extractor, reference: list[PromptSamples], keep_images: Callable[[Any], bool] = lambda c: False,
                 on_checkpoint: Callable[[Any], None] = lambda c: None):
    """One run's checkpoints on `prompts` against the pretrained `reference` (whose samples are
    reused as the update-0 row: the same model, prompts and noise).

    Returns (comparison rows, per-prompt rows, {update: samples} of the checkpoints `keep_images`
    selects, with their images)."""
    rows, per_prompt_rows, kept = [], [], {}
    for ckpt in checkpoints:
        want = keep_images(ckpt)
        if ckpt.path is None and (not want or reference[0].images is not None):
            per_prompt = reference
        else:
            per_prompt = sample_checkpoint(models, ckpt, prompts, ecfg, extractor, keep_images=want)
        if want:
            kept[ckpt.update] = per_prompt
        row, per = checkpoint_metrics(per_prompt, reference)
        head = {"run": run.label, "method": run.method, "update": ckpt.update}
        rows.append({**head, **row, "checkpoint": ckpt.label})
        per_prompt_rows += [{**head, **p, "prompt": prompts[p["prompt_index"]]} for p in per]
        on_checkpoint(ckpt)
    return rows, per_prompt_rows, kept


def _write_csv(path: Path, columns, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in columns})


def run_eval(ecfg: EvalConfig, run_dirs: list[str | Path]) -> dict:
    """Evaluate every checkpoint of `run_dirs` (module docstring); returns what eval.json holds."""
    from tqdm import tqdm

    from nablagfn.common.config_io import validate
    from nablagfn.common.evaluation import build_feature_extractor
    from nablagfn.learner.local_trainer import resolve_device

    validate(ecfg)
    if not run_dirs:
        raise ConfigError("runs: give at least one RUN_DIR")
    runs = [load_run(d) for d in run_dirs]
    unique_labels(runs)
    checkpoints = {r.label: find_checkpoints(r.run_dir, r.cfg.updates) for r in runs}
    source, prompts, overlap = eval_prompts(ecfg, runs)
    if ecfg.threads > 0:
        torch.set_num_threads(ecfg.threads)
    device = resolve_device(ecfg.device)
    model_path = ecfg.features_model_path or next((r.cfg.reward.model_path for r in runs
                                                   if r.cfg.reward.model_path), None)
    extractor = build_feature_extractor(ecfg.features, model_path, device)
    out = Path(ecfg.out)
    out.mkdir(parents=True, exist_ok=True)

    rows, per_prompt_rows = [], []
    references: dict[str, list] = {}
    models, models_key = None, None
    bar = tqdm(total=sum(len(c) for c in checkpoints.values()), desc="nablagfn eval",
               disable=not ecfg.progress)
    for run in runs:
        cfg = run.cfg
        key = json.dumps([to_dict(cfg.model), to_dict(cfg.lora), to_dict(cfg.sampler), to_dict(cfg.reward)],
                         sort_keys=True)
        if key != models_key:  # runs of one model/LoRA/sampler/reward config share the loaded models
            models = None  # free the previous pipeline before loading the next
            models, models_key = RunModels.load(cfg, device), key
        if key not in references:  # the pretrained reference of this config, computed once
            references[key] = sample_checkpoint(models, Checkpoint(0, None), prompts, ecfg, extractor)
        r_rows, r_per, _ = evaluate_run(run, models, checkpoints[run.label], prompts, ecfg, extractor,
                                        references[key], on_checkpoint=lambda ckpt: bar.update(1))
        rows += r_rows
        per_prompt_rows += r_per
    bar.close()

    csv_path, per_path = out / "comparison.csv", out / "per_prompt.csv"
    _write_csv(csv_path, COLUMNS, rows)
    _write_csv(per_path, PER_PROMPT_COLUMNS, per_prompt_rows)
    plots = {
        "reward_vs_diversity": str(plot_pareto(
            rows, "diversity", "reward_mean", out / "pareto_reward_diversity.png", maximize_x=True,
            xlabel="diversity: mean pairwise cosine distance (higher is better)",
            ylabel="mean log R (higher is better)", title=f"reward vs diversity ({extractor.name})")),
        "reward_vs_prior_drift": str(plot_pareto(
            rows, "prior_drift", "reward_mean", out / "pareto_reward_prior_drift.png", maximize_x=False,
            xlabel="prior drift: Fréchet distance to the pretrained samples (lower is better)",
            ylabel="mean log R (higher is better)", title=f"reward vs prior drift ({extractor.name})")),
    }
    summary = {"runs": {r.label: str(r.run_dir) for r in runs}, "prompts_source": source,
               "prompts": prompts, "training_prompt_overlap": overlap, "samples_per_prompt": ecfg.samples,
               "seed": ecfg.seed, "batch_size": ecfg.batch_size, "features": extractor.name,
               "features_model_path": model_path, "device": str(device), "csv": str(csv_path),
               "per_prompt_csv": str(per_path), "plots": plots, "rows": rows}
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    return summary
