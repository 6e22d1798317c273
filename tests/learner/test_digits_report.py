"""The digits report: rejection sampling draws the exact target, the statistics are what they say,
the report runs at the end of a local training run (and again from the run dir with the same
numbers), writes its grids/curves/table, and the digits preset parses.

Real parts, shrunk: the pixel family's tiny random UNet (8×8 grey) and a random small DigitCNN.
"""
import json

import pytest
import torch

from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import ConfigError, build_config
from nablagfn.common.models import build_tiny_pipeline
from nablagfn.learner.digits_metrics import (class_histogram, class_share, rejection_keep,
                                             within_class_diversity)
from nablagfn.learner.digits_report import DigitsReportError, format_table, report_from_run_dir
from nablagfn.learner.local_trainer import LocalTrainer
from nablagfn.rewards_service.rewards import DigitCNN

SMALL = ["sampler.num_steps=3", "batch_trajectories=4", "train_batch_trajectories=2", "chunk_trajectories=4", "eval_trajectories=4",
         "grid_size=4", "flow_net.block_out_channels=[16]", "subsample.timestep_fraction=0.5",
         "report.samples=24", "report.reference_pool=48", "threads=1", "progress=false"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ pure math
def test_rejection_sampling_draws_the_tilted_distribution():
    """A discrete p# over 4 atoms and R = p(k|x) per atom: kept frequencies must follow p#·R/Z.
    200k draws: each frequency's standard error is ≤ 0.003, so 0.01 is > 3σ."""
    g = torch.Generator().manual_seed(0)
    p_prior = torch.tensor([0.4, 0.3, 0.2, 0.1])
    r = torch.tensor([0.05, 0.5, 0.9, 1.0])
    atoms = torch.multinomial(p_prior, 200_000, replacement=True, generator=g)
    keep = rejection_keep(r[atoms].log(), 1.0, g)
    target = p_prior * r / (p_prior * r).sum()
    freq = torch.bincount(atoms[keep], minlength=4).double() / keep.sum()
    torch.testing.assert_close(freq, target.double(), atol=0.01, rtol=0)
    assert float(keep.double().mean()) == pytest.approx(float((p_prior * r).sum()), abs=0.005)
    # β = 2 tilts by R²
    keep2 = rejection_keep(r[atoms].log(), 2.0, g)
    t2 = p_prior * r ** 2 / (p_prior * r ** 2).sum()
    torch.testing.assert_close(torch.bincount(atoms[keep2], minlength=4).double() / keep2.sum(), t2.double(),
                               atol=0.01, rtol=0)


def test_rejection_rejects_an_invalid_bound():
    with pytest.raises(ValueError, match="log_bound"):
        rejection_keep(torch.tensor([-1.0, 0.5]), 1.0)
    with pytest.raises(ValueError, match="beta"):
        rejection_keep(torch.tensor([-1.0]), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        rejection_keep(torch.tensor([float("nan")]), 1.0)


def test_class_share_histogram_and_within_class_diversity():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 2.0], [0.0, 4.0]])
    assert class_share(probs, 1) == 0.5 and class_histogram(probs) == [2, 2]
    assert within_class_diversity(feats, probs, 1) == pytest.approx(3.0, abs=1e-12)  # rows 1 and 3
    assert within_class_diversity(feats, probs, 0) == pytest.approx(2.0, abs=1e-12)  # rows 0 and 2


# --------------------------------------------------------------------------------- the preset
def test_digits_preset_parses_with_the_issue_settings():
    cfg = build_config(TrainConfig, load_preset("digits"))
    assert (cfg.model.pretrained, cfg.model.family, cfg.prompts.source) == ("digits", "pixel", "none")
    assert cfg.reward.name == "digit_classifier" and cfg.reward.kwargs == {"digit": 3}
    assert cfg.objective.reward_scale == 1.0 and cfg.report.kind == "digits"
    other = build_config(TrainConfig, load_preset("digits"), overrides=["reward.kwargs.digit=7"])
    assert other.reward.kwargs == {"digit": 7}
    with pytest.raises(ConfigError, match="report.samples"):
        build_config(TrainConfig, load_preset("digits"), overrides=["report.samples=1"])


# -------------------------------------------------------------------------- the report, end to end
@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_parts")
    model = build_tiny_pipeline("pixel", root / "tiny-pixel", seed=0)
    torch.manual_seed(0)
    cls_dir = DigitCNN(width=8, features=16).save(root / "classifier")
    return model, cls_dir


def _cfg(parts, run_dir, *extra):
    model, cls_dir = parts
    return build_config(TrainConfig, load_preset("digits"), {"updates": 2, "run_dir": str(run_dir)},
                        overrides=[f"model.pretrained={model}", f"reward.weights_path={cls_dir}", *SMALL, *extra])


def test_local_run_writes_the_report_and_the_run_dir_reproduces_it(parts, tmp_path, capsys):
    cfg = _cfg(parts, tmp_path / "run")
    summary = LocalTrainer(cfg).run()
    rep = summary["report"]
    out = tmp_path / "run"
    for name in ("digits_before.png", "digits_after.png", "digits_curves.png", "digits_report.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "digits_report.json").read_text())["sets"] == json.loads(json.dumps(rep["sets"]))
    before, after, ref = rep["sets"]["before"], rep["sets"]["after"], rep["sets"]["reference"]
    assert (before["n"], after["n"]) == (48, 24) and ref["n"] == round(48 * rep["reference_acceptance"])
    assert sum(before["class_histogram"]) == 48
    assert before["share_k"] == before["class_histogram"][3] / 48
    assert before["prior_drift"] == pytest.approx(0.0, abs=1e-8)  # the pretrained set against itself
    assert rep["digit"] == 3 and rep["beta"] == 1.0 and rep["curves"]
    assert "digits report: k = 3" in capsys.readouterr().out
    # Same seeds, the saved LoRA reloaded into a fresh pipeline: the same samples up to the float
    # round-off of the reloaded adapter (1e-6 on outputs), hence the same classifications and nearly
    # the same statistics (tolerance 1e-3 on feature distances of order 1).
    again = report_from_run_dir(out)
    for name in ("before", "after", "reference"):
        assert again["sets"][name]["class_histogram"] == rep["sets"][name]["class_histogram"]
        for key in ("diversity_k", "prior_drift", "mean_log_r"):
            a, b = again["sets"][name][key], rep["sets"][name][key]
            assert (a != a and b != b) or a == pytest.approx(b, abs=1e-3), (name, key)
    assert "reference" in format_table(again)


def test_report_needs_the_digit_classifier_reward(parts, tmp_path):
    from nablagfn.learner.digits_report import digits_report
    from nablagfn.rewards_service.rewards import BrightnessReward

    cfg = _cfg(parts, tmp_path / "run")
    with pytest.raises(DigitsReportError, match="reward.name=digit_classifier"):
        digits_report(None, None, cfg, BrightnessReward(), None, tmp_path / "run")
    with pytest.raises(DigitsReportError, match="lora"):
        report_from_run_dir(tmp_path / "empty", cfg=cfg)
