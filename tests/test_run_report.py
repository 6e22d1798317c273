"""The end-of-run report (nablagfn/run_report.py) of a tiny-preset local run: 2 updates with a LoRA
snapshot after each, reported on 2 held-out prompts × 3 samples with the weight-free pixel features.
Checks the PNGs (valid, readable by matplotlib), report.json's numbers against metrics.jsonl and
against an independent recomputation through plain diffusers, the curves-only mode, a failing
report (recorded, never raised), and the config checks."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import ConfigError, build_config
from nablagfn.common.evaluation import Checkpoint, frechet_distance_features, mean_pairwise_distance
from nablagfn.common.evaluation.heldout import HELDOUT_ANIMALS
from nablagfn.evaluate import prompt_seed
from nablagfn.learner.local_trainer import LocalTrainer
from nablagfn.run_report import pick_checkpoints, report_features, write_run_report

SMALL = ["sampler.num_steps=4", "batch_trajectories=2", "train_batch_trajectories=0", "chunk_trajectories=2",
         "eval_trajectories=2", "grid_size=2", "flow_net.block_out_channels=[32]",
         "subsample.timestep_fraction=0.5", "objective.reward_scale=1e4", "threads=1", "checkpoint_every=1",
         "report.num_prompts=2", "report.samples_per_prompt=3", "report.grid_columns=3", "report.seed=4"]
PROMPTS, SAMPLES, SEED = 2, 3, 4
PNGS = ("curves", "reward_vs_diversity", "reward_vs_prior_drift", "samples_pretrained", "samples_final")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_dir, run_dir, *extra) -> TrainConfig:
    return build_config(TrainConfig, load_preset("tiny"), {"updates": 2, "seed": 0, "run_dir": str(run_dir),
                                                           "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", *SMALL, *extra])


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report_run")
    summary = LocalTrainer(_cfg(tiny_dir, run_dir)).run()
    return {"dir": run_dir, "summary": summary, "report": json.loads((run_dir / "report.json").read_text())}


def test_report_writes_readable_pngs(run):
    import matplotlib.image

    rep = run["report"]
    assert "error" not in rep
    assert set(rep["files"]) == set(PNGS)
    assert run["summary"]["run_report"]["files"] == rep["files"]
    for key in PNGS:
        path = run["dir"] / rep["files"][key]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (key, img.shape)
        assert float(img[..., :3].std()) > 0.01, key  # not a blank canvas


def test_report_numbers_match_the_run(run):
    rep, run_dir = run["report"], run["dir"]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tr = rep["training"]
    assert tr["updates"] == 2
    assert tr["reward_first"] == metrics[0]["reward_mean"] and tr["reward_last"] == metrics[-1]["reward_mean"]
    assert tr["loss_terms_last"]["loss"] == metrics[-1]["loss"]
    assert {"forward", "backward", "terminal"} <= set(tr["loss_terms_last"])
    assert not {"valid", "skipped", "optimizer_steps", "seconds"} & set(tr["loss_terms_last"])  # counters, timings

    ev = rep["evaluation"]
    assert ev["prompts"] == list(HELDOUT_ANIMALS[:PROMPTS]) and ev["features"] == "pixels"
    rows = ev["checkpoints"]
    assert [r["update"] for r in rows] == [0, 1, 2]  # pretrained, snapshot 1, final (= snapshot 2)
    for r in rows:
        for k in ("reward_mean", "reward_std", "diversity", "prior_drift", "diversity_l2"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["update"], k)
        assert r["samples"] == PROMPTS * SAMPLES and r["non_finite"] == 0
    assert rows[0]["prior_drift"] == pytest.approx(0, abs=1e-9)  # the reference itself (measured 2e-13)
    assert rows[-1]["prior_drift"] > 0  # the trained LoRA moved the samples (measured ~0.07)
    # the grids show every sample (grid_columns = samples_per_prompt): their log R means are the rows'
    for tag, row in (("pretrained", rows[0]), ("final", rows[-1])):
        shown = ev["grids"][tag]["log_r"]
        assert len(shown) == PROMPTS and all(len(s) == SAMPLES for s in shown)
        assert float(np.mean(shown)) == pytest.approx(row["reward_mean"], abs=1e-6)


def test_final_row_recomputed_through_plain_diffusers(run, tiny_dir):
    """Prompt 0 of the final LoRA and the pretrained model, rebuilt without the recipe: diffusers'
    load_lora_weights, the same seed and batches (chunk_trajectories=2: 2 + 1), the brightness
    reward, pixel features computed here (32×32 area resize, scaled to [-1, 1])."""
    from diffusers import StableDiffusionPipeline

    from nablagfn.common.models import Denoiser
    from nablagfn.common.schedule import make_schedule
    from nablagfn.common.trajectories import sample_trajectories
    from nablagfn.rewards_service.rewards import BrightnessReward, decode_latents

    cfg = yaml.safe_load((run["dir"] / "config.yaml").read_text())
    prompt = HELDOUT_ANIMALS[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.load_lora_weights(run["dir"] / "lora")
    d = Denoiser.from_pipeline(pipe)
    sched = make_schedule(dict(pipe.scheduler.config), cfg["sampler"]["num_steps"], "ddim")
    cond, uncond = d.encode_prompts([prompt]), d.encode_prompts([""])

    def draw(adapter):
        gen = torch.Generator().manual_seed(prompt_seed(SEED, 0))
        images = []
        for b in (2, SAMPLES - 2):
            with torch.no_grad():
                tr = sample_trajectories(d, sched, cond.expand(b, -1, -1), uncond, cfg["sampler"]["guidance_scale"],
                                         "ddim", cfg["sampler"]["eta"], gen, adapter=adapter)
                images.append(decode_latents(tr.final, pipe.vae))
        images = torch.cat(images)
        feats = torch.nn.functional.interpolate(images, size=(32, 32), mode="area").mul(2).sub(1).flatten(1)
        return BrightnessReward()(images).double(), feats

    log_r, feats = draw(adapter=True)
    ref_log_r, ref_feats = draw(adapter=False)
    ev = run["report"]["evaluation"]
    row = next(p for p in ev["per_prompt"] if p["update"] == 2 and p["prompt_index"] == 0)
    # float32 round-off of the same ops on the same weights (measured in test_evaluate: reward
    # bit-identical, diversity 2e-9); the final LoRA moves the per-prompt reward by ~3e-5 here.
    assert row["reward_mean"] == pytest.approx(float(log_r.mean()), abs=1e-6)
    assert ev["grids"]["final"]["log_r"][0] == pytest.approx(log_r.tolist(), abs=1e-6)
    assert ev["grids"]["pretrained"]["log_r"][0] == pytest.approx(ref_log_r.tolist(), abs=1e-6)
    assert row["diversity"] == pytest.approx(float(mean_pairwise_distance(feats, "cosine")), abs=1e-6)
    assert row["prior_drift"] == pytest.approx(float(frechet_distance_features(feats, ref_feats)), rel=1e-4)


def test_curves_only_when_end_of_run_is_off(run, tiny_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run["dir"], copy)
    for name in PNGS + ("report",):
        (copy / f"{name}.{'json' if name == 'report' else 'png'}").unlink()
    rep = write_run_report(copy, _cfg(tiny_dir, copy, "report.end_of_run=false"))
    assert rep["files"] == {"curves": "curves.png"} and rep["evaluation"] is None
    assert (copy / "curves.png").is_file() and not (copy / "samples_final.png").exists()
    assert json.loads((copy / "report.json").read_text())["training"] == run["report"]["training"]


def test_a_failing_report_is_recorded_not_raised(run, tiny_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run["dir"], copy)
    shutil.rmtree(copy / "lora")
    shutil.rmtree(copy / "checkpoints")
    with pytest.warns(UserWarning, match="end-of-run report"):
        rep = write_run_report(copy, _cfg(tiny_dir, copy))
    assert "CheckpointError" in rep["error"] and str(copy) in rep["error"]  # names the run dir
    assert rep["files"] == {"curves": "curves.png"}
    assert json.loads((copy / "report.json").read_text())["error"] == rep["error"]


def test_pick_checkpoints_keeps_the_ends_evenly_spaced():
    ckpts = [Checkpoint(u, None) for u in range(11)]
    assert [c.update for c in pick_checkpoints(ckpts, 3)] == [0, 5, 10]
    assert [c.update for c in pick_checkpoints(ckpts, 6)] == [0, 2, 4, 6, 8, 10]
    assert pick_checkpoints(ckpts[:3], 6) == ckpts[:3]


def test_auto_features_fall_back_to_pixels_and_say_why(tiny_dir, tmp_path):
    extractor, notes = report_features(_cfg(tiny_dir, tmp_path), "cpu")
    assert extractor.name == "pixels" and any(n.startswith("clip:") for n in notes)
    feats = extractor(torch.rand(2, 1, 8, 8))  # grey images are repeated to 3 channels
    assert feats.shape == (2, 3 * 32 * 32) and float(feats.min()) >= -1 and float(feats.max()) <= 1


@pytest.mark.parametrize("override, field", [("report.grid_columns=5", "report.grid_columns"),
                                             ("report.samples_per_prompt=1", "report.samples_per_prompt"),
                                             ("report.max_checkpoints=1", "report.max_checkpoints"),
                                             ("report.num_prompts=0", "report.num_prompts")])
def test_bad_report_config_names_the_field(tiny_dir, tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(tiny_dir, tmp_path, override)
