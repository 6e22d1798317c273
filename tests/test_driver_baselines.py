"""The baselines run through the distributed service (`nablagfn train --mode distributed method=...`):
real Ray actors, an embedded Redis and the tiny pipeline. Each method makes its updates from the
samplers' records and the reward workers' scores, trains every trajectory once, publishes LoRA
versions the samplers pick up, and writes a run dir that `nablagfn eval` compares across methods."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "rewards_service"))
from reward_fixtures import tiny_clip, write_tokenizer_files  # noqa: E402
from test_driver import SMALL  # noqa: E402  (tests/ is on sys.path: rootdir-less test modules)

from nablagfn.cli import main  # noqa: E402

UPDATES = 2
METHODS = ("draft", "ddpo", "residual-db")


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("baselines_distributed")
    # one local runtime for the three runs (the driver joins a Ray it finds running): 2 CPUs, as the machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             object_store_memory=256 * 1024 * 1024)
    out = {}
    try:
        for method in METHODS:
            run = root / method
            rc = main(["train", "--preset", "tiny", "--updates", str(UPDATES), "--run-dir", str(run),
                       "--no-progress", f"model.pretrained={tiny_dir}", f"method={method}", "draft.k=2", *SMALL])
            assert rc == 0, method
            out[method] = run
    finally:
        ray.shutdown()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_baseline_trains_through_the_distributed_service(runs, method):
    run = runs[method]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == UPDATES and summary["dead_letters"] == 0
    assert summary["learner"]["trained"] == 2 * UPDATES
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in metrics] == list(range(1, UPDATES + 1))
    assert all(isinstance(m["loss"], float) and m["optimizer_steps"] >= 1 for m in metrics)
    trained = [json.loads(x)["traj_id"] for x in (run / "trained.jsonl").read_text().splitlines()]
    assert len(trained) == len(set(trained)) == 2 * UPDATES
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # residual DB writes its scalar log-flow head f_ψ; the others have no flow network
    assert (run / "flow_net.safetensors").is_file() == (method == "residual-db")
    assert "method: " + method in (run / "config.yaml").read_text()


def test_eval_compares_the_distributed_runs(runs, tmp_path):
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    tok = write_tokenizer_files(clip_dir)
    tiny_clip(tok).save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    out = tmp_path / "eval"
    rc = main(["eval", *(str(runs[m]) for m in METHODS), "--samples", "2", "--max-prompts", "1", "--seed", "3",
               "--features", "clip", "--features-model", str(clip_dir), "--out", str(out), "--no-progress",
               "batch_size=2", "threads=1"])
    assert rc == 0
    with open(out / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == set(METHODS)
    for m in METHODS:  # the pretrained model (update 0) and the final LoRA of each run
        updates = sorted(int(r["update"]) for r in rows if r["method"] == m)
        assert updates[0] == 0 and updates[-1] == UPDATES
    assert all(math.isfinite(float(r["reward_mean"])) and math.isfinite(float(r["diversity"])) for r in rows)
    for name in ("pareto_reward_diversity.png", "pareto_reward_prior_drift.png"):
        assert (out / name).stat().st_size > 0
