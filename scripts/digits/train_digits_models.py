"""Train the digits demo's models and write them, with a quality note, to models/digits/.

    python scripts/digits/train_digits_models.py [--out models/digits] [--seed 0]

Data: scikit-learn's bundled `load_digits` (1797 grey 8×8 images, values 0–16), split 80/20
stratified with `seed`; both models see the training split only.
- DDPM: a diffusers UNet2DModel (widths 32/64/64, attention below 8×8, ~1.2 M parameters) on the
  native 8×8 pixels scaled to [-1, 1], ε-prediction under Stable Diffusion's scaled-linear schedule
  (the schedule the objective was measured on); EMA weights are saved. Saved as a DDPMPipeline
  folder (model_index.json, unet/, scheduler/) whose scheduler is a DDIMScheduler config with
  set_alpha_to_one=False, so the sampler's last step keeps σ > 0.
- Classifier: `DigitCNN` (rewards_service/rewards/digit_classifier.py), trained with ±1-pixel
  shifts and pixel noise; held-out accuracy on the test split.
- quality.json: accuracy, the class histogram of DDPM samples (DDIM η = 1 at the eval step
  counts) as the classifier labels them, a nearest-neighbour memorisation check, timings.
Deterministic given --seed and --threads (CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def load_split(seed: int):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) float32 in [0, 1], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte), torch.from_numpy(yte).long())


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random ±1-pixel shifts (zero fill) and pixel noise of std U(0, 0.1), clamped to [0, 1]."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    x = padded[..., dy:dy + 8, dx:dx + 8]
    std = 0.1 * torch.rand(x.shape[0], 1, 1, 1, generator=g)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_classifier(xtr, ytr, xte, yte, seed: int, epochs: int):
    from nablagfn.rewards_service.rewards.digit_classifier import DigitCNN

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(xtr) / 64))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(model(augment(xtr[idx], g)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
        train_acc = float((model(xtr).argmax(1) == ytr).float().mean())
    return model, {"test_accuracy": acc, "train_accuracy": train_acc, "epochs": epochs}


def train_ddpm(xtr, seed: int, steps: int, batch: int, lr: float, ema_decay: float):
    from nablagfn.common.models.pixel import tiny_pixel_unet
    from nablagfn.common.schedule import SD_SCHEDULER_CONFIG, alphas_cumprod_from_config

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    unet = tiny_pixel_unet(widths=(32, 64, 64))
    ema = copy.deepcopy(unet).requires_grad_(False)
    alpha = torch.tensor(alphas_cumprod_from_config(SD_SCHEDULER_CONFIG), dtype=torch.float32)
    T = alpha.shape[0]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    x0_all = xtr * 2 - 1
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x0_all), (batch,), generator=g)
        x0 = x0_all[idx]
        t = torch.randint(0, T, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alpha[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(float(loss.detach()))
    n = max(1, steps // 10)
    return ema, {"steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay,
                 "loss_first_10pct": float(np.mean(losses[:n])), "loss_last_10pct": float(np.mean(losses[-n:])),
                 "parameters": sum(p.numel() for p in unet.parameters())}


@torch.no_grad()
def sample_pretrained(out_dir: Path, n: int, num_steps: int, seed: int, batch: int = 250) -> torch.Tensor:
    """n DDIM-η=1 samples of the saved pipeline through the production path, images (n, 3, 8, 8) in [0, 1]."""
    from nablagfn.common.config import ModelConfig
    from nablagfn.common.models import Denoiser, load_pipeline
    from nablagfn.common.schedule import make_schedule
    from nablagfn.common.trajectories import sample_trajectories
    from nablagfn.rewards_service.rewards import decode_latents

    pipe = load_pipeline(ModelConfig(pretrained=str(out_dir), family="pixel"))
    den = Denoiser.from_pipeline(pipe)
    schedule = make_schedule(dict(pipe.scheduler.config), num_steps, "ddim")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        traj = sample_trajectories(den, schedule, den.encode_prompts([""] * b), None, 1.0, "ddim", 1.0, gen)
        out.append(decode_latents(traj.final, pipe.vae))
    return torch.cat(out)


def nearest_distances(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """L2 distance (pixels in [0, 1]) from each row of a to its nearest row of ref."""
    return torch.cdist(a.flatten(1).double(), ref.flatten(1).double()).min(1).values


def sample_quality(out_dir, classifier, xtr, xte, n, steps_list, seed) -> dict:
    out = {}
    for steps in steps_list:
        t0 = time.perf_counter()
        imgs = sample_pretrained(out_dir, n, steps, seed)
        secs = time.perf_counter() - t0
        grey = imgs.mean(1, keepdim=True)
        with torch.no_grad():
            probs = classifier(grey).softmax(1)
        hist = torch.bincount(probs.argmax(1), minlength=10).tolist()
        share = np.asarray(hist) / n
        nn_sample = nearest_distances(grey, xtr)
        out[str(steps)] = {
            "samples": n, "class_histogram": hist,
            "tv_from_uniform": float(0.5 * np.abs(share - 0.1).sum()),
            "mean_max_prob": float(probs.max(1).values.mean()),
            "share_max_prob_above_0.9": float((probs.max(1).values > 0.9).float().mean()),
            "median_nn_dist_to_train": float(nn_sample.median()),
            "share_nn_dist_below_0.5": float((nn_sample < 0.5).float().mean()),
            "sampling_seconds": secs}
    test_nn = nearest_distances(xte, xtr)
    out["reference_test_split"] = {"median_nn_dist_to_train": float(test_nn.median()),
                                   "share_nn_dist_below_0.5": float((test_nn < 0.5).float().mean())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "models" / "digits"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ddpm-steps", type=int, default=6000)
    p.add_argument("--ddpm-batch", type=int, default=128)
    p.add_argument("--ddpm-lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--classifier-epochs", type=int, default=80)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--eval-steps", type=int, nargs="+", default=[20, 50])
    args = p.parse_args(argv)

    from diffusers import DDIMScheduler

    from nablagfn.common.models.pixel import save_pixel_pipeline
    from nablagfn.common.schedule import SD_SCHEDULER_CONFIG

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    xtr, ytr, xte, yte = load_split(args.seed)
    times = {}
    t0 = time.perf_counter()
    classifier, cls_info = train_classifier(xtr, ytr, xte, yte, args.seed, args.classifier_epochs)
    times["classifier_seconds"] = time.perf_counter() - t0
    print(f"classifier: {cls_info} in {times['classifier_seconds']:.0f}s", flush=True)
    t0 = time.perf_counter()
    unet, ddpm_info = train_ddpm(xtr, args.seed, args.ddpm_steps, args.ddpm_batch, args.ddpm_lr, args.ema_decay)
    times["ddpm_seconds"] = time.perf_counter() - t0
    print(f"ddpm: {ddpm_info} in {times['ddpm_seconds']:.0f}s", flush=True)
    save_pixel_pipeline(unet, DDIMScheduler(**SD_SCHEDULER_CONFIG), out)
    classifier.save(out / "classifier")
    t0 = time.perf_counter()
    quality = sample_quality(out, classifier, xtr, xte, args.eval_samples, args.eval_steps, args.seed + 2)
    times["eval_seconds"] = time.perf_counter() - t0
    note = {"data": {"source": "sklearn.datasets.load_digits", "train": len(xtr), "test": len(xte),
                     "split": f"stratified 80/20, random_state={args.seed}"},
            "classifier": cls_info, "ddpm": ddpm_info, "ddpm_samples_by_steps": quality,
            "sampler": "DDIM eta=1 (common/trajectories.py), final state at alpha_bar(t=0)",
            "args": vars(args), "torch": torch.__version__, "times": times}
    (out / "quality.json").write_text(json.dumps(note, indent=2))
    print(json.dumps(quality, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
