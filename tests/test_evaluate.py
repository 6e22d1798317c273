"""`nablagfn eval` end to end: two tiny-preset runs trained here by the local trainer (2 updates, a
checkpoint after each), evaluated on held-out prompts with a tiny random CLIP as the feature
extractor. Checks the checkpoints, the CSV and its numbers, both PNG plots, an independent
recomputation of one checkpoint through plain diffusers, and the errors of bad inputs."""
import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "rewards_service"))
from reward_fixtures import tiny_clip, write_tokenizer_files  # noqa: E402

from nablagfn.cli import load_preset, main  # noqa: E402
from nablagfn.common.config import TrainConfig  # noqa: E402
from nablagfn.common.config_io import build_config  # noqa: E402
from nablagfn.common.evaluation import frechet_distance_features, mean_pairwise_distance  # noqa: E402
from nablagfn.common.evaluation.heldout import HELDOUT_ANIMALS  # noqa: E402
from nablagfn.common.models import build_tiny_sd_pipeline  # noqa: E402
from nablagfn.common.prompts import ANIMALS  # noqa: E402
from nablagfn.evaluate import COLUMNS, prompt_seed  # noqa: E402
from nablagfn.learner.local_trainer import LocalTrainer  # noqa: E402

# The tiny preset shrunk to seconds per run: 4 sampling steps, 2 trajectories per update, a
# 1-level g_φ, and a checkpoint after every update.
SMALL = ["sampler.num_steps=4", "batch_trajectories=2", "train_batch_trajectories=0", "chunk_trajectories=2",
         "eval_trajectories=2", "grid_size=2", "flow_net.block_out_channels=[32]",
         "subsample.timestep_fraction=0.5", "objective.reward_scale=1e4", "threads=1", "checkpoint_every=1"]
RUNS = {"run_a": ([], 0), "run_b": (["objective.no_flow=true", "optim.lr=0.05"], 1)}
SAMPLES, PROMPTS, BATCH = 3, 2, 2  # batch 2 < 3 samples: the chunked noise draws are exercised
# Trained checkpoints move the samples: their drift measured 3e-5 (run_a) and 7e-4 (run_b, 5× lr),
# the pretrained row's 0 (see test_csv_numbers); 1e-8 lies far between.
MOVED = 1e-8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    tiny = build_tiny_sd_pipeline(root / "tiny-sd", seed=0)
    clip_dir = root / "clip"
    clip_dir.mkdir()
    tok = write_tokenizer_files(clip_dir)
    tiny_clip(tok).save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    runs = {}
    for name, (extra, seed) in RUNS.items():
        cfg = build_config(TrainConfig, load_preset("tiny"),
                           {"updates": 2, "seed": seed, "run_dir": str(root / name), "progress": False},
                           overrides=[f"model.pretrained={tiny}", *SMALL, *extra])
        LocalTrainer(cfg).run()
        runs[name] = root / name
    out = root / "eval"
    rc = main(["eval", str(runs["run_a"]), str(runs["run_b"]), "--samples", str(SAMPLES), "--max-prompts",
               str(PROMPTS), "--seed", "5", "--features", "clip", "--features-model", str(clip_dir), "--out",
               str(out), "--no-progress", f"batch_size={BATCH}", "threads=1"])
    return {"rc": rc, "tiny": tiny, "clip": clip_dir, "runs": runs, "out": out, "root": root}


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_trainer_saves_a_checkpoint_per_update(setup):
    run = setup["runs"]["run_a"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["update_1", "update_2"]  # no leftover .tmp folders
    for n in (1, 2):
        assert json.loads((run / "checkpoints" / f"update_{n}" / "checkpoint.json").read_text()) == {"update": n}
    last = load_file(str(run / "checkpoints/update_2/pytorch_lora_weights.safetensors"))
    first = load_file(str(run / "checkpoints/update_1/pytorch_lora_weights.safetensors"))
    final = load_file(str(run / "lora/pytorch_lora_weights.safetensors"))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(first[k], last[k]) for k in last)  # update 2 moved the LoRA


def test_eval_writes_the_csv_and_both_plots(setup):
    assert setup["rc"] == 0
    out = setup["out"]
    with open(out / "comparison.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:7] == ["run", "method", "update", "reward_mean", "reward_std", "diversity", "prior_drift"]
    assert tuple(header) == COLUMNS
    for name in ("pareto_reward_diversity.png", "pareto_reward_prior_drift.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == (640, 480)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["prompts_source"] == "heldout:animals" and summary["features"] == "clip"
    assert summary["prompts"] == list(HELDOUT_ANIMALS[:PROMPTS])
    assert not set(summary["prompts"]) & set(ANIMALS) and summary["training_prompt_overlap"] == 0


def test_csv_numbers(setup):
    rows = read_csv(setup["out"] / "comparison.csv")
    assert [(r["run"], int(r["update"])) for r in rows] == [(n, u) for n in RUNS for u in (0, 1, 2)]
    for r in rows:
        assert r["method"] == "residual-nabla-db"
        for k in ("reward_mean", "reward_std", "diversity", "prior_drift", "diversity_l2"):
            assert math.isfinite(float(r[k])), (r, k)
        assert float(r["reward_std"]) > 0 and 0 < float(r["diversity"]) <= 2 and float(r["diversity_l2"]) > 0
        assert int(r["samples"]) == SAMPLES * PROMPTS and int(r["non_finite"]) == 0
        if int(r["update"]) == 0:
            assert r["checkpoint"] == "pretrained"
            # The pretrained row is sampled in its own pass with the reference's seeds, so its
            # features equal the reference's and the Fréchet distance is round-off: ≤ 1e-12 ·
            # tr Σ (tr Σ of these features is ≈ 0.15; measured 0 and 4e-17).
            assert float(r["prior_drift"]) <= 1e-12
        else:
            assert r["checkpoint"].endswith(f"checkpoints/update_{r['update']}")
            assert float(r["prior_drift"]) > MOVED
    by = {(r["run"], int(r["update"])): r for r in rows}
    # same pretrained model, prompts and seeds: the two runs' pretrained rows are the same numbers
    assert {k: v for k, v in by[("run_a", 0)].items() if k != "run"} == \
        {k: v for k, v in by[("run_b", 0)].items() if k != "run"}
    assert by[("run_b", 2)]["reward_mean"] != by[("run_a", 2)]["reward_mean"]  # different runs, different numbers

    per = read_csv(setup["out"] / "per_prompt.csv")
    assert len(per) == len(rows) * PROMPTS
    for r in rows:
        mine = [p for p in per if p["run"] == r["run"] and p["update"] == r["update"]]
        assert len(mine) == PROMPTS
        # equal samples per prompt: the row is the mean of the per-prompt numbers (float64 means of
        # float32 values, printed in full: rel 1e-6 / abs 1e-9 is round-off)
        for k in ("reward_mean", "diversity", "prior_drift"):
            assert float(r[k]) == pytest.approx(sum(float(p[k]) for p in mine) / PROMPTS, rel=1e-6, abs=1e-9), k


def test_one_checkpoint_recomputed_through_plain_diffusers(setup):
    """run_b update 2, prompt 0, rebuilt without the recipe: diffusers' load_lora_weights, the same
    seeds and batches, the brightness reward, the tiny CLIP's own get_image_features."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    from nablagfn.common.models import Denoiser
    from nablagfn.common.schedule import make_schedule
    from nablagfn.common.trajectories import sample_trajectories
    from nablagfn.rewards_service.rewards import BrightnessReward, decode_latents, clip_preprocess

    run = setup["runs"]["run_b"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    prompt = HELDOUT_ANIMALS[0]
    pipe = StableDiffusionPipeline.from_pretrained(setup["tiny"])
    pipe.load_lora_weights(run / "checkpoints" / "update_2")
    d = Denoiser.from_pipeline(pipe)
    sched = make_schedule(dict(pipe.scheduler.config), cfg["sampler"]["num_steps"], "ddim")
    cond, uncond = d.encode_prompts([prompt]), d.encode_prompts([""])
    clip = CLIPModel.from_pretrained(setup["clip"]).eval()
    reward = BrightnessReward()

    def draw(adapter):
        gen = torch.Generator().manual_seed(prompt_seed(5, 0))
        images = []
        for b in (BATCH, SAMPLES - BATCH):
            with torch.no_grad():
                tr = sample_trajectories(d, sched, cond.expand(b, -1, -1), uncond, cfg["sampler"]["guidance_scale"],
                                         "ddim", cfg["sampler"]["eta"], gen, adapter=adapter)
                images.append(decode_latents(tr.final, pipe.vae))
        images = torch.cat(images)
        with torch.no_grad():
            out = clip.get_image_features(pixel_values=clip_preprocess(images, 32))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return reward(images).double(), feats

    log_r, feats = draw(adapter=True)
    _, ref_feats = draw(adapter=False)
    row = next(p for p in read_csv(setup["out"] / "per_prompt.csv")
               if p["run"] == "run_b" and p["update"] == "2" and p["prompt_index"] == "0")
    # Tolerances: the same float32 ops on the same weights (diffusers' loader and ours put identical
    # LoRA tensors in), so agreement is float32 round-off (measured: reward bit-identical, diversity
    # 2e-9, drift 2e-6 relative). The per-prompt reward moves by ~1e-5 and the diversity by ~1e-4
    # between checkpoints, so atol 1e-6 tells a wrong checkpoint apart; the drift (~6e-4) is a
    # difference of traces ≈ 0.15 whose float32 features carry ~1e-7 relative error: rel 1e-4.
    assert float(row["reward_mean"]) == pytest.approx(float(log_r.mean()), abs=1e-6)
    assert float(row["diversity"]) == pytest.approx(float(mean_pairwise_distance(feats, "cosine")), abs=1e-6)
    assert float(row["prior_drift"]) == pytest.approx(float(frechet_distance_features(feats, ref_feats)), rel=1e-4)


def _copy_run(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for key, value in config.items():
        section, field = key.split("__")
        cfg[section][field] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def test_bad_inputs_fail_naming_the_problem(setup, tmp_path, capsys):
    a = str(setup["runs"]["run_a"])
    prompts_file = tmp_path / "train_prompts.txt"
    prompts_file.write_text("cat\ndog\n")
    from_file = _copy_run(setup["runs"]["run_a"], tmp_path / "from_file", prompts__source=str(prompts_file))
    photo = _copy_run(setup["runs"]["run_a"], tmp_path / "photo", prompts__source="photo")
    (tmp_path / "empty").mkdir()
    clip = ["--features", "clip", "--features-model", str(setup["clip"])]
    cases = [
        ([str(tmp_path / "empty"), *clip], "config.yaml"),
        ([a, "--samples", "1", *clip], "samples"),
        ([a, "--features", "clip"], "features_model_path"),
        ([a, "--features", "no_such_extractor"], "no_such_extractor"),
        ([str(from_file), *clip], "--prompts"),
        ([a, str(photo), *clip], "different prompt sources"),
        ([a, "--prompts", str(tmp_path / "missing.txt"), *clip], "missing.txt"),
        ([a, "no_such_key=1", *clip], "no_such_key"),
    ]
    for args, needle in cases:
        rc = main(["eval", *args, "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, (args, err)
    assert not (tmp_path / "out" / "comparison.csv").exists()
