"""`nablagfn train --mode local`: the whole fine-tuning recipe in one process (torchtune style).

The loop only calls components — `sample_training_batch` (common/trajectories.py: trajectories and
their `subsample_steps`), then `plan_flow_queries` / `score_flow_queries` / `drop_invalid` / `NablaDBLearner.learn`
(learner/nabla_db_step.py) — and writes the run directory:

    config.yaml               the full resolved TrainConfig
    metrics.jsonl             one line per update: reward mean/std, loss terms, grad norms,
                              skipped (non-finite) trajectories, seconds per phase
    eval.jsonl                one line per evaluation (fixed prompts and noise): reward mean/std
    samples_start.png / samples_end.png       grids of the first `grid_size` evaluation samples
    curves.png, reward_vs_diversity.png, samples_pretrained.png / samples_final.png, report.json
                              the end-of-run report (nablagfn/run_report.py, cfg.report)
    samples_start.safetensors / samples_end.safetensors   their latents and log R
    lora/                     the final LoRA in diffusers format (pipe.load_lora_weights(dir))
    checkpoints/update_<n>/   with checkpoint_every > 0: the LoRA after update n (every that many
                              updates), diffusers format, and checkpoint.json {"update": n}
    flow_net.safetensors      g_φ's weights (FlowNet(cfg.flow_net, …).load_state_dict)
    summary.json              start / end evaluation, eval seed and prompts, totals

Deterministic given the config (seed included) on a given machine: the LoRA/g_φ initialisation
draws from torch's global RNG seeded with `seed`, sampling and subsampling from their own
generators, prompts from numpy generators seeded from (prompts.seed, seed).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import to_dict, validate
from nablagfn.common.schedule import make_schedule
from nablagfn.common.trajectories import (Trajectories, pipeline_latent_shape, sample_trajectories,
                                         sample_training_batch)

from .nabla_db_step import (NablaDBLearner, PolicyModels, UpdateData, drop_invalid,
                            plan_flow_queries, score_flow_queries)

EVAL_SEED_OFFSET = 10_007  # eval noise: Generator(seed + offset), the same at every evaluation


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def eval_seed(cfg: TrainConfig) -> int:
    return cfg.seed + EVAL_SEED_OFFSET


def eval_prompts(cfg: TrainConfig, source) -> list[str]:
    """The fixed evaluation prompts (their own generator: training draws do not move them)."""
    return source.sample(cfg.eval_trajectories, rng=np.random.default_rng((cfg.prompts.seed, cfg.seed, 1)))[1]


def check_inputs(cfg: TrainConfig) -> None:
    """Fail before loading any weights: the reward name, the prompt source, the model folder."""
    from nablagfn.common.models.loading import ModelLoadError, PRESETS, resolve_pretrained
    from nablagfn.common.prompts import PromptError, build_prompt_source
    from nablagfn.rewards_service.rewards import RewardError, resolve_reward

    try:
        resolve_reward(cfg.reward.name)
    except RewardError as exc:
        raise RewardError(f"reward.name={cfg.reward.name!r}: {exc}") from None
    try:
        build_prompt_source(cfg.prompts)
    except PromptError as exc:
        raise PromptError(f"prompts.source={cfg.prompts.source!r}: {exc}") from None
    if cfg.model.pretrained not in PRESETS:
        try:
            resolve_pretrained(cfg.model)
        except ModelLoadError as exc:
            msg = str(exc)
            raise ModelLoadError(msg if "model.pretrained" in msg else f"model.pretrained: {msg}") from None


def model_cache_dir(cfg: TrainConfig) -> Path:
    """Where presets (model.pretrained=tiny) are built once and reused: cfg.model_cache_dir, else
    $NABLAGFN_CACHE/models, else ~/.cache/nablagfn/models (builds are atomic and deterministic)."""
    if cfg.model_cache_dir:
        return Path(cfg.model_cache_dir).expanduser()
    root = os.environ.get("NABLAGFN_CACHE") or Path.home() / ".cache" / "nablagfn"
    return Path(root) / "models"


def reward_vae(pipe):
    """The VAE the reward decodes through, in float32 (a copy if the pipeline's is half)."""
    import copy

    vae = pipe.vae
    if next(vae.parameters()).dtype in (torch.float32, torch.float64):
        return vae
    return copy.deepcopy(vae).float()


class PhaseTimer:
    """`with timer("sampling"): ...` accumulates wall seconds per phase (CUDA-synchronised)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.seconds = {}


def save_grid(images: torch.Tensor, captions: list[str], path: Path, min_side: int = 128) -> None:
    """A grid of images (B, 3, H, W) in [0, 1] with a caption under each (PIL's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    arr = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    H, W = arr.shape[1:3]
    scale = max(1, math.ceil(min_side / max(H, W)))
    cw, ch = W * scale, H * scale
    font = ImageFont.load_default()
    line_h = 14
    cap_h = 2 * line_h + 6
    grid = Image.new("RGB", (cols * cw, rows * (ch + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        cell = Image.fromarray(arr[i]).resize((cw, ch), Image.NEAREST)
        x0, y0 = c * cw, r * (ch + cap_h)
        grid.paste(cell, (x0, y0))
        for j, line in enumerate(captions[i].split("\n")[:2]):
            while line and draw.textlength(line, font=font) > cw - 4:
                line = line[:-2] + "…" if len(line) > 1 else ""
            draw.text((x0 + 2, y0 + ch + 3 + j * line_h), line, fill="black", font=font)
    grid.save(path)


class LocalTrainer:
    """Holds the pipeline, the LoRA policy, g_φ, the reward and the learner of one local run."""

    def __init__(self, cfg: TrainConfig):
        from nablagfn.common.models import Denoiser, FlowNet, add_lora, load_pipeline
        from nablagfn.common.prompts import build_prompt_source
        from nablagfn.rewards_service.rewards import build_reward

        validate(cfg)
        check_inputs(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.pipe = load_pipeline(cfg.model, cache_dir=model_cache_dir(cfg), device=self.device)
        add_lora(self.pipe.unet, cfg.lora)
        self.denoiser = Denoiser.from_pipeline(self.pipe)
        flow_net = None
        if not cfg.objective.no_flow and cfg.method == "residual-nabla-db":  # the baselines have no g_φ
            flow_net = FlowNet.from_pipeline(cfg.flow_net, self.pipe).to(self.device)
        self.reward = build_reward(cfg.reward, self.device)
        self.vae = reward_vae(self.pipe)
        self.prompts = build_prompt_source(cfg.prompts)
        self.schedule = make_schedule(dict(self.pipe.scheduler.config), cfg.sampler.num_steps, cfg.sampler.kind)
        self.latent_shape = pipeline_latent_shape(self.pipe, self.denoiser, cfg.model.resolution)
        self.uncond = self.denoiser.encode_prompts([""])
        self.models = PolicyModels(self.denoiser, flow_net, self.schedule, self.uncond,
                                   cfg.sampler.guidance_scale, self.device)
        if cfg.method == "residual-nabla-db":
            self.learner = NablaDBLearner(cfg, self.models)
        else:  # DRaFT, ReFL, DDPO, residual DB: learner/baselines_step.py
            from .baselines_step import build_baseline_learner
            self.learner = build_baseline_learner(cfg, self.models, self.vae, self.reward)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed)
        self.subsample_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.prompt_rng = np.random.default_rng((cfg.prompts.seed, cfg.seed))
        self.eval_prompts = eval_prompts(cfg, self.prompts)
        self.eval_cond = self.denoiser.encode_prompts(self.eval_prompts)
        self.timer = PhaseTimer(self.device)
        self.skipped_total = 0
        self.update_count = 0

    # -- components the loop calls ---------------------------------------------------------------
    def sample(self, n: int) -> tuple[Trajectories, torch.Tensor, torch.Tensor, list[str]]:
        """n policy trajectories for freshly drawn prompts, and the kept steps of each."""
        _, prompts = self.prompts.sample(n, rng=self.prompt_rng)
        cond = self.denoiser.encode_prompts(prompts)
        traj, keep = sample_training_batch(self.denoiser, self.schedule, cond, self.uncond, self.cfg.sampler,
                                           self.cfg.subsample, self.sample_gen, self.subsample_gen,
                                           self.latent_shape, self.device)
        return traj, keep, cond, prompts

    def update(self) -> dict:
        """One update: sample → flow queries (x̂₀) → rewards → drop non-finite → learn."""
        cfg, t = self.cfg, self.timer
        if cfg.method != "residual-nabla-db":  # a baseline samples, scores and learns itself
            return self.learner.update(self)
        t.reset()
        with t("sampling"):
            traj, keep, cond, prompts = self.sample(cfg.batch_trajectories)
            queries, fwd_point = plan_flow_queries(self.models, traj, keep, cond, cfg)
        with t("reward"):
            scored = score_flow_queries(queries, self.vae, self.reward, prompts, cfg.reward.chunk_size)
        with t("learner"):
            data = UpdateData(traj, keep, cond, prompts, queries, scored, fwd_point)
            log_r = data.terminal_log_r
            data, valid = drop_invalid(data)
            logs = self.learner.learn(data)
        self.update_count += 1
        skipped = int((~valid).sum())
        self.skipped_total += skipped
        ok = log_r[valid]
        return {"update": self.update_count,
                "reward_mean": float(ok.mean()) if ok.numel() else float("nan"),
                "reward_std": float(ok.std(unbiased=False)) if ok.numel() else float("nan"),
                "valid": int(valid.sum()), "skipped": skipped, "skipped_total": self.skipped_total,
                **logs, "seconds": sum(t.seconds.values()),
                **{f"seconds_{k}": v for k, v in t.seconds.items()}}

    @torch.no_grad()
    def evaluate(self) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy on the fixed eval prompts and noise: (stats, latents, images, log R)."""
        from nablagfn.rewards_service.rewards import decode_latents

        sc = self.cfg.sampler
        gen = torch.Generator().manual_seed(eval_seed(self.cfg))
        traj = sample_trajectories(self.denoiser, self.schedule, self.eval_cond, self.uncond, sc.guidance_scale,
                                   sc.kind, sc.eta, gen, latent_shape=self.latent_shape)
        latents = traj.final
        images, log_r = [], []
        for start in range(0, latents.shape[0], self.cfg.reward.chunk_size):
            img = decode_latents(latents[start:start + self.cfg.reward.chunk_size].float(), self.vae)
            log_r.append(self.reward(img, self.eval_prompts[start:start + img.shape[0]]).float())
            images.append(img)
        log_r, images = torch.cat(log_r), torch.cat(images)
        finite = log_r[torch.isfinite(log_r)]
        stats = {"update": self.update_count, "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
                 "reward_std": float(finite.std(unbiased=False)) if finite.numel() else float("nan"),
                 "non_finite": int((~torch.isfinite(log_r)).sum()), "n": int(log_r.numel())}
        return stats, latents, images, log_r

    def write_samples(self, tag: str, latents, images, log_r) -> None:
        from safetensors.torch import save_file

        g = self.cfg.grid_size
        caps = [f"{p}\nlog R = {float(r):.4g}" for p, r in zip(self.eval_prompts[:g], log_r[:g])]
        save_grid(images[:g], caps, self.run_dir / f"samples_{tag}.png")
        save_file({"latents": latents.detach().float().cpu().contiguous(),
                   "log_r": log_r.detach().float().cpu().contiguous()},
                  str(self.run_dir / f"samples_{tag}.safetensors"))

    def save_checkpoint(self) -> Path:
        """The LoRA now, in diffusers format, with checkpoint.json {"update": n}, at
        run_dir/checkpoints/update_<n>/ (written beside and renamed: never seen half-written)."""
        import shutil

        from nablagfn.common.models import save_lora_diffusers

        target = self.run_dir / "checkpoints" / f"update_{self.update_count}"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora_diffusers(self.pipe, tmp)
        (tmp / "checkpoint.json").write_text(json.dumps({"update": self.update_count}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target

    def save(self) -> None:
        from safetensors.torch import save_file

        from nablagfn.common.models import save_lora_diffusers

        save_lora_diffusers(self.pipe, self.run_dir / "lora")
        flow = self.learner.flow_state_dict()
        if flow:
            save_file(flow, str(self.run_dir / "flow_net.safetensors"))

    # -- the recipe --------------------------------------------------------------------------------
    def run(self) -> dict:
        import yaml
        from tqdm import tqdm

        cfg, out = self.cfg, self.run_dir
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        for name in ("metrics.jsonl", "eval.jsonl", "summary.json"):  # a stale summary would name the final update
            (out / name).unlink(missing_ok=True)
        if (out / "checkpoints").is_dir():  # a previous run's checkpoints would pose as this run's
            import shutil
            shutil.rmtree(out / "checkpoints")
        t0 = time.perf_counter()

        def log_eval(tag: Optional[str]) -> dict:
            stats, latents, images, log_r = self.evaluate()
            with open(out / "eval.jsonl", "a") as fh:
                fh.write(json.dumps(stats) + "\n")
            if tag:
                self.write_samples(tag, latents, images, log_r)
            return stats

        start = log_eval("start")
        bar = tqdm(range(cfg.updates), desc="nablagfn train", disable=not cfg.progress, mininterval=1.0)
        last: dict = {}
        for u in bar:
            last = self.update()
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(last) + "\n")
            bar.set_postfix(reward=f"{last['reward_mean']:.4g}", loss=f"{last['loss']:.3g}",
                            skipped=last["skipped_total"])
            if cfg.eval_every and (u + 1) % cfg.eval_every == 0 and u + 1 < cfg.updates:
                log_eval(None)
            if cfg.checkpoint_every and (u + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        end = log_eval("end")
        self.save()
        from nablagfn.run_report import report_for_trainer as end_of_run_report  # curves, plots, grids

        run_report = end_of_run_report(self)
        report = None
        if cfg.report.kind == "digits":  # learner/digits_report.py: grids, shares, diversity, curves
            from .digits_report import report_for_trainer
            report = report_for_trainer(self)
        summary = {"updates": cfg.updates, "seed": cfg.seed, "reward": cfg.reward.name,
                   "eval_start": start, "eval_end": end,
                   "eval_reward_gain": end["reward_mean"] - start["reward_mean"],
                   "eval_seed": eval_seed(cfg), "eval_prompts": self.eval_prompts,
                   "skipped_total": self.skipped_total, "optimizer_steps": self.learner.steps,
                   "wall_seconds": time.perf_counter() - t0, "device": str(self.device),
                   "last_update": last, "report": report,
                   "run_report": {k: run_report.get(k) for k in ("files", "error") if k in run_report}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def train_local(cfg: TrainConfig) -> dict:
    """Run the recipe of `cfg` in this process; returns the summary (also in run_dir/summary.json)."""
    return LocalTrainer(cfg).run()
