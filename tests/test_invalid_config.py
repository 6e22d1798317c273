"""Invalid configs fail at start (issue 6, item 2): `nablagfn train` with a bad distributed field
exits 2 before anything starts (no run dir, no Redis, no Ray), and the message names the dotted
field. The checks are the sections' `validate()` in common/config.py, run by config_io.from_dict."""
import subprocess
import sys
import time

import pytest

from nablagfn.cli import main

CASES = [
    ("distributed.num_samplers=0", "distributed.num_samplers: must be >= 1"),
    ("distributed.num_reward_workers=0", "distributed.num_reward_workers: must be >= 1"),
    ("distributed.max_policy_lag=-1", "distributed.max_policy_lag: must be >= 0"),
    ("distributed.block_ms=40000", "distributed.block_ms: must be below redis.socket_timeout_s"),
    ("distributed.namespace=a:b", "distributed.namespace: must not contain ':'"),
    ("distributed.latent_dtype=int8", "distributed.latent_dtype: 'int8' is not one of"),
    ("distributed.redis.url=http://user:pw@host:6379", "distributed.redis.url: must start with redis://"),
    ("distributed.redis.max_record_bytes=10", "distributed.redis.max_record_bytes: must be >= 1024"),
    ("distributed.redis.max_stream_depth=0", "distributed.redis.max_stream_depth: must be >= 1"),
    ("distributed.metrics.port_range=[9500,9400]", "distributed.metrics.port_range: invalid range"),
    ("distributed.metrics.bind_address=not an address", "distributed.metrics.bind_address: 'not an address' is neither"),
    ("distributed.sampler.resources={GPU: 1}", "distributed.sampler.resources: custom resource names"),
    ("distributed.learner.num_gpus=-1", "distributed.learner.num_gpus: must be >= 0"),
    ("distributed.num_samplerz=2", "unknown config key(s) in section 'distributed': ['num_samplerz']"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0].split("=")[0] for c in CASES])
def test_bad_distributed_field_fails_at_start_naming_it(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["train", "--preset", "tiny", "--run-dir", str(run_dir), "--no-progress", override])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "pw@" not in err  # a rejected URL is not echoed with its password either
    assert not run_dir.exists() and time.perf_counter() - t0 < 10  # nothing was started


def test_the_process_exit_code_is_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nablagfn", "train", "--preset", "tiny", "--run-dir",
                           str(tmp_path / "run"), "distributed.redis.max_record_bytes=10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "distributed.redis.max_record_bytes" in proc.stderr
