"""The one-process trainer on the tiny SD pipeline: a CLI run writes every output, its LoRA reloads
through plain diffusers and reproduces the trainer's own final samples, runs are deterministic,
non-finite reward rows are skipped and counted, and bad inputs fail early naming the field."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nablagfn.cli import load_preset, main
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.models import Denoiser
from nablagfn.common.prompts import PromptSource
from nablagfn.common.schedule import make_schedule
from nablagfn.common.trajectories import sample_trajectories
from nablagfn.learner.local_trainer import LocalTrainer
from nablagfn.rewards_service.rewards import BrightnessReward, register_reward

# The tiny preset, shrunk so that each run takes seconds: 4 steps, 3 trajectories, a 1-level g_φ.
SMALL = ["sampler.num_steps=4", "batch_trajectories=3", "train_batch_trajectories=0", "chunk_trajectories=2", "eval_trajectories=4",
         "grid_size=3", "flow_net.block_out_channels=[32]", "subsample.timestep_fraction=0.5",
         "objective.reward_scale=1e4", "threads=1"]
POISON = "poison"


class PoisonReward(BrightnessReward):
    """Brightness, but NaN for every image whose prompt is 'poison'."""

    def log_reward(self, images, prompts=None):
        out = super().log_reward(images, prompts)
        bad = torch.tensor([p == POISON for p in prompts], device=out.device)
        return torch.where(bad, torch.full_like(out, float("nan")), out)


register_reward("test_poison_nan")(lambda cfg, device=None: PoisonReward())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_dir, run_dir, *extra, updates=2, seed=0) -> TrainConfig:
    return build_config(TrainConfig, load_preset("tiny"),
                        {"updates": updates, "seed": seed, "run_dir": str(run_dir), "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", *SMALL, *extra])


@pytest.fixture(scope="module")
def cli_run(tiny_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli_run")
    rc = main(["train", "--mode", "local", "--preset", "tiny", "--reward", "brightness", "--updates", "2",
               "--seed", "3", "--run-dir", str(run_dir), "--no-progress", f"model.pretrained={tiny_dir}", *SMALL])
    assert rc == 0
    return run_dir


def test_cli_run_writes_every_output(cli_run):
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "samples_start.png",
                 "samples_end.png", "samples_start.safetensors", "samples_end.safetensors",
                 "flow_net.safetensors", "lora/pytorch_lora_weights.safetensors"):
        assert (cli_run / name).is_file(), name
    lines = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("reward_mean", "reward_std", "forward", "backward", "terminal", "regulariser", "loss",
                    "grad_norm_lora", "grad_norm_flow", "skipped", "seconds", "seconds_sampling",
                    "seconds_reward", "seconds_learner"):
            assert key in m and math.isfinite(m[key]), key
        assert m["skipped"] == 0 and m["valid"] == 3 and m["optimizer_steps"] == 1
    import yaml
    saved = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["reward"]["name"] == "brightness" and saved["updates"] == 2
    assert saved["sampler"]["num_steps"] == 4  # the resolved config: preset, flags and overrides
    from PIL import Image
    assert Image.open(cli_run / "samples_end.png").size[0] >= 128
    summary = json.loads((cli_run / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2 and len(summary["eval_prompts"]) == 4


def test_saved_lora_reloads_in_diffusers_and_reproduces_the_final_samples(cli_run, tiny_dir):
    from diffusers import StableDiffusionPipeline

    summary = json.loads((cli_run / "summary.json").read_text())
    saved = load_file(str(cli_run / "samples_end.safetensors"))["latents"]
    start = load_file(str(cli_run / "samples_start.safetensors"))["latents"]
    assert (saved - start).abs().max() > 0  # two updates moved the policy

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.load_lora_weights(cli_run / "lora")
    d = Denoiser.from_pipeline(pipe)
    cond, uncond = d.encode_prompts(summary["eval_prompts"]), d.encode_prompts([""])
    sched = make_schedule(dict(pipe.scheduler.config), 4, "ddim")
    gen = torch.Generator().manual_seed(summary["eval_seed"])
    with torch.no_grad():
        tr = sample_trajectories(d, sched, cond, uncond, 5.0, "ddim", 1.0, gen)
    # Tolerance 1e-4 (latents of scale ~10): the reloaded LoRA holds bit-identical float32 weights
    # (diffusers format, with the adapter metadata that keeps α/r), and the sampler draws the same
    # noise with the same ops, so the samples agree to float32 round-off (measured: bit-identical);
    # a lost α/r scaling or a missing layer moves them by >1e-2.
    assert torch.allclose(tr.final, saved, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        pre = sample_trajectories(d, sched, cond, uncond, 5.0, "ddim", 1.0,
                                  torch.Generator().manual_seed(summary["eval_seed"]), adapter=False)
    assert torch.allclose(pre.final, start, atol=1e-4, rtol=1e-5)  # adapter off = the start samples


def test_same_seed_same_run(cli_run, tiny_dir, tmp_path):
    """A second run of the CLI run's config, in process, logs the same numbers (seconds aside)."""
    cfg = _cfg(tiny_dir, tmp_path / "again", "reward.name=brightness", updates=2, seed=3)
    LocalTrainer(cfg).run()
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("seconds")}  # noqa: E731
    a = [strip(json.loads(x)) for x in (cli_run / "metrics.jsonl").read_text().splitlines()]
    b = [strip(json.loads(x)) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert a == b
    assert torch.equal(load_file(str(cli_run / "samples_end.safetensors"))["latents"],
                       load_file(str(tmp_path / "again" / "samples_end.safetensors"))["latents"])


def test_non_finite_reward_rows_are_skipped_and_counted(tiny_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{POISON}\ncat\n")
    cfg = _cfg(tiny_dir, tmp_path / "run", "reward.name=test_poison_nan", f"prompts.source={prompts_file}",
               "batch_trajectories=4", updates=2, seed=7)
    tr = LocalTrainer(cfg)
    # Replay the trainer's prompt draws: the poisoned trajectories are exactly the skipped ones.
    rng = np.random.default_rng((cfg.prompts.seed, cfg.seed))
    src = PromptSource("replay", [POISON, "cat"])
    for _ in range(2):
        expected = sum(p == POISON for p in src.sample(4, rng=rng)[1])
        assert 0 < expected < 4, "pick a seed whose batches mix both prompts"
        lora_before = [p.detach().clone() for p in tr.learner.lora_params]
        m = tr.update()
        assert m["skipped"] == expected and m["valid"] == 4 - expected
        assert math.isfinite(m["loss"]) and math.isfinite(m["reward_mean"]) and m["optimizer_steps"] == 1
        assert all(torch.isfinite(p).all() for p in tr.learner.lora_params)
        assert any(not torch.equal(a, b) for a, b in zip(lora_before, tr.learner.lora_params))
    assert tr.skipped_total == m["skipped_total"] > 0


def test_a_batch_with_only_non_finite_rows_is_not_trained_on(tiny_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{POISON}\n")
    cfg = _cfg(tiny_dir, tmp_path / "run", "reward.name=test_poison_nan", f"prompts.source={prompts_file}",
               "objective.backward_estimator=stein", updates=1)
    tr = LocalTrainer(cfg)
    before = [p.detach().clone() for p in tr.learner.lora_params]
    m = tr.update()
    assert m["skipped"] == 3 and m["valid"] == 0 and m["optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, tr.learner.lora_params))


@pytest.mark.parametrize("args, field", [
    (["--reward", "no_such_reward"], "reward.name"),
    (["model.pretrained=/no/such/model/dir"], "model.pretrained"),
    (["objective.no_such_option=1"], "no_such_option"),
    (["sampler.num_steps=0"], "sampler.num_steps"),
])
def test_bad_inputs_fail_early_naming_the_field(args, field, tmp_path, capsys):
    run_dir = tmp_path / "never"
    rc = main(["train", "--preset", "tiny", "--run-dir", str(run_dir), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc != 0 and field in err, err
    assert not run_dir.exists()  # nothing was loaded or written


OBJECTIVE_VARIANTS = [
    {},  # the defaults: stein_lambda, ε units, pretrained guess through a VJP
    {"backward_estimator": "stein", "x0_grad": "diagonal"},
    {"backward_estimator": "sampled", "units": "score", "gamma": "squared", "guess_x0_source": "policy",
     "forward_trains_flow": True, "target_flow_tau": 1.0},
    {"guess_x0_source": "none", "unet_reg_scale": 10.0},
    {"forward_point": "pretrained_mean"},
    {"no_flow": True},
]


def test_every_objective_option_trains_on_the_diffusion_policy(tiny_dir, tmp_path):
    """One trainer, the objective swapped between updates: every layout gives finite terms and a step."""
    import dataclasses

    tr = LocalTrainer(_cfg(tiny_dir, tmp_path / "run", "train_batch_trajectories=2", updates=0))
    base = tr.cfg.objective
    for variant in OBJECTIVE_VARIANTS:
        tr.cfg.objective = dataclasses.replace(base, **variant)
        before = [p.detach().clone() for p in tr.learner.lora_params]
        m = tr.update()
        assert m["optimizer_steps"] == 2, variant  # 3 trajectories, 2 per optimizer step
        for k in ("forward", "backward", "terminal", "regulariser", "loss", "grad_norm_lora"):
            assert math.isfinite(m[k]), (variant, k)
        assert m["forward"] > 0, variant
        assert (m["backward"] == 0) == bool(variant.get("no_flow")), variant
        assert any(not torch.equal(a, b) for a, b in zip(before, tr.learner.lora_params)), variant


def test_prompt_conditioned_flow_and_dpm_sde_sampler(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path / "run", "flow_net.prompt_conditioned=true", "sampler.kind=dpm_sde",
               updates=0)
    tr = LocalTrainer(cfg)
    flow_before = [p.detach().clone() for p in tr.models.flow_net.parameters()]
    m = tr.update()
    assert math.isfinite(m["loss"]) and m["backward"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(flow_before, tr.models.flow_net.parameters()))


def test_bench_step_prints_time_and_memory_per_phase(tiny_dir, capsys):
    rc = main(["bench", "step", "--preset", "tiny", "--warmup", "0", f"model.pretrained={tiny_dir}", *SMALL])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    phases = {"sampling", "reward", "learner"}
    assert phases <= set(out["wall_seconds"]) and phases <= set(out["peak_memory_mb"])
    assert all(out["wall_seconds"][p] > 0 and out["peak_memory_mb"][p] > 0 for p in phases)
    assert out["wall_seconds"]["total"] == pytest.approx(sum(out["wall_seconds"][p] for p in phases), abs=1e-3)


@pytest.mark.parametrize("value_lambda", [1.0, 0.5])
def test_scalar_potential_flow_with_the_value_term(tiny_dir, tmp_path, value_lambda):
    """g_φ = ∇_x Φ (a double backward through the g_φ UNet) with the log-space DB value term: every
    term finite, the value term non-zero, LoRA and g_φ both move."""
    tr = LocalTrainer(_cfg(tiny_dir, tmp_path / "run", "objective.flow_potential=true", "objective.flow_output=score",
                           "objective.value_loss_scale=1.0", f"objective.value_lambda={value_lambda}", updates=0))
    lora = [p.detach().clone() for p in tr.learner.lora_params]
    flow = [p.detach().clone() for p in tr.learner.flow_params]
    m = tr.update()
    for k in ("forward", "backward", "terminal", "value", "loss", "grad_norm_lora", "grad_norm_flow"):
        assert math.isfinite(m[k]), k
    assert m["value"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(lora, tr.learner.lora_params))
    assert any(not torch.equal(a, b) for a, b in zip(flow, tr.learner.flow_params))
