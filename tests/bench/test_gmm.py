"""GMM benchmark: closed forms against independent computations, spec errors, a short CLI run."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nablagfn.bench.gmm import exact
from nablagfn.bench.gmm.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
RING = ROOT / "benchmarks" / "gmm_ring8.json"
SHARP = ROOT / "benchmarks" / "gmm_sharp2.json"


def test_pretrained_eps_is_minus_scaled_score_of_noised_density():
    spec = load_spec(SHARP)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    a = torch.linspace(0.05, 0.99, 16, dtype=torch.float64)
    z = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(exact.noised_log_density(spec, z, a).sum(), z)
    # float64 closed form vs autograd of the density: round-off only
    assert torch.allclose(exact.pretrained_eps(spec, x, a), -(1 - a)[:, None].sqrt() * score, atol=1e-10)


def test_target_weights_match_nearest_mode_shares_of_exact_target_samples():
    spec = load_spec(SHARP)
    s = exact.sample_target(spec, 400_000, torch.Generator().manual_seed(1))
    # tails crossing into the neighbouring mode's cell are < 1e-3 for std 0.4 and spacing 2.3;
    # MC error of a share with 4e5 samples is ~1e-3: 5e-3 bounds both.
    assert torch.allclose(exact.mode_weights(spec, s), exact.target_weights(spec), atol=5e-3)


def test_log_flow_matches_monte_carlo_posterior_expectation():
    """F̃(x_t) = E[R(x₀)^β | x_t], by sampling x₀ from the data and weighting by p(x_t | x₀)."""
    spec = parse_spec({"dim": 2, "means": [[2, 0], [-2, 0]], "weights": [1, 3], "std": 0.5,
                       "reward": {"components": [{"center": [1.0, 1.0], "scale": 0.8, "weight": 1.0}]},
                       "beta": 1.5})
    gen = torch.Generator().manual_seed(2)
    x0 = exact.sample_data(spec, 2_000_000, gen)
    a = torch.tensor([0.4], dtype=torch.float64)
    xt = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    logw = -((xt - a.sqrt() * x0) ** 2).sum(1) / (2 * (1 - a))
    w = torch.softmax(logw, 0)
    mc = torch.log((w * torch.exp(spec.beta * exact.log_reward(spec, x0))).sum())
    # self-normalised IS over 2e6 draws: relative error ~1e-3; 1e-2 in log space is a safe bound
    assert abs(mc.item() - exact.log_flow(spec, xt, a).item()) < 1e-2


@pytest.mark.parametrize("bad,field", [
    ({"means": [[0, 0]]}, "weights"),
    ({"std": -1.0}, "std"),
    ({"means": [[0, 0, 0], [1, 1, 1]]}, "means[0]"),
    ({"beta": 2.0}, "beta"),
    ({"reward": {"components": [{"center": [0, 0]}]}}, "scale"),
])
def test_malformed_specs_name_the_field(bad, field):
    data = json.loads(SHARP.read_text())
    data.update(bad)
    with pytest.raises(SpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(data)


def test_missing_key_named(tmp_path):
    data = json.loads(RING.read_text())
    del data["std"]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(data))
    r = subprocess.run([sys.executable, "-m", "nablagfn", "bench", "gmm", "--spec", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "std" in r.stderr


def test_bad_override_is_rejected(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nablagfn", "bench", "gmm", "--spec", str(RING), "--out",
                        str(tmp_path / "o"), "objective.gamma=cubed"], capture_output=True, text=True)
    assert r.returncode != 0 and "objective.gamma" in r.stderr


def test_short_run_writes_outputs_and_learns(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "nablagfn", "bench", "gmm", "--spec", str(RING), "--out", str(out),
                        "--updates", "150", "--no-progress", "eval_every=150", "eval_samples=512",
                        "sampler.num_steps=20"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("method", "tv", "empirical_weights", "target_weights", "mean_log_reward", "target_mean_log_reward",
                "updates", "wall_seconds", "pretrained", "exact_flow", "flow_error"):
        assert key in s
    samples = np.load(out / "samples.npy")
    assert samples.shape == (8192, 2) and np.isfinite(samples).all()
    assert (out / "learning_curve.png").stat().st_size > 1000
    # 150 updates already move most of the way from the pretrained TV (≈0.5) towards the target
    assert s["pretrained"]["tv"] > 0.4 and s["tv"] < 0.25
    assert s["exact_flow"]["tv"] < 0.06


def test_objective_beta_must_be_the_specs(tmp_path):
    import json

    from nablagfn.bench.gmm.bench import run_gmm_bench
    from nablagfn.bench.gmm.run import GMMBenchConfig
    from nablagfn.bench.gmm.spec import load_spec

    spec_file = tmp_path / "b2.json"
    spec_file.write_text(json.dumps({"dim": 1, "means": [[0.0], [2.0]], "weights": [1, 1], "std": 0.4,
                                     "reward": {"components": [{"center": [2.0], "scale": 1.0, "weight": 1.0}]},
                                     "beta": 2.0}))
    with pytest.raises(ValueError, match="beta=2.0"):
        run_gmm_bench(load_spec(spec_file), GMMBenchConfig(updates=0), tmp_path / "out", progress=False)
