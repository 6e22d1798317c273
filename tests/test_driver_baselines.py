"""The baselines run through the distributed service (`nablagfn train --mode distributed method=...`):
real Ray actors, an embedded Redis and the tiny pipeline. Each method makes its updates from the
samplers' records and the reward workers' scores, trains every trajectory once, publishes LoRA
versions the samplers pick up, and writes the run dir `nablagfn eval` reads."""
import json

import pytest

from nablagfn.cli import main

from test_driver import SMALL  # tests/ is on sys.path (pytest rootdir-less modules)

UPDATES = 2


@pytest.mark.parametrize("method", ["draft", "ddpo", "residual-db"])
def test_baseline_trains_through_the_distributed_service(tiny_dir, tmp_path, method):
    run = tmp_path / method
    rc = main(["train", "--preset", "tiny", "--updates", str(UPDATES), "--run-dir", str(run), "--no-progress",
               f"model.pretrained={tiny_dir}", f"method={method}", "draft.k=2", *SMALL])
    assert rc == 0
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
