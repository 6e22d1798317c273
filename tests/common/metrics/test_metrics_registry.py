"""common/metrics without Ray: a role's endpoint takes the first free port of its range and fails
naming the field when none is; counters mirror the loop's counters by increments; the file-SD
document has Prometheus' shape; disabled metrics serve nothing and record nothing."""
import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nablagfn.common.metrics import MetricsServerError, RoleMetrics, write_targets


def values(rm: RoleMetrics) -> dict[str, float]:
    text = urllib.request.urlopen(rm.url, timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + (f"{{{s.labels['reason']}}}" if "reason" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_port_range_fallback_and_exhaustion():
    a = RoleMetrics("sampler", 0, node="n1")
    b = RoleMetrics("sampler", 1, node="n1")
    try:
        url_a = a.serve("127.0.0.1", (9600, 9699))
        port_a = int(url_a.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(MetricsServerError, match="distributed.metrics.port_range"):
            b.serve("127.0.0.1", (port_a, port_a))  # the only port is taken
        url_b = b.serve("127.0.0.1", (port_a, port_a + 50))
        assert url_b != url_a and url_b.startswith("http://127.0.0.1:")
    finally:
        a.close()
        b.close()


def test_counters_follow_the_loop_counters():
    rm = RoleMetrics("learner", 0, node="n1")
    rm.serve("127.0.0.1", (9600, 9699))
    try:
        counters = {"trained": 4, "dropped_stale": 1, "duplicates": 0, "dead_lettered": 2,
                    "seconds_learn": 3.0, "seconds_wait": 1.0}
        m = {"seconds_learn": 3.0, "seconds_wait": 1.0, "reward_mean": -0.5, "reward_std": 0.25}
        rm.learner_update(m, {"loss": 1.5, "forward": 0.5, "note": "text"}, [0, 1, 1, 0], 12, counters)
        counters.update(trained=8, duplicates=3)
        rm.sync(counters)
        rm.sync(counters)  # no change: no increment
        v = values(rm)
        assert v["nablagfn_trajectories_total"] == 8 and v["nablagfn_dead_lettered_total"] == 2
        assert v["nablagfn_dropped_total{stale}"] == 1 and v["nablagfn_dropped_total{duplicate}"] == 3
        assert v["nablagfn_policy_lag_count"] == 4 and v["nablagfn_policy_lag_sum"] == 2
        assert v["nablagfn_learner_busy_fraction"] == pytest.approx(0.75, abs=1e-12)  # exact ratio 3/(3+1)
        assert v["nablagfn_samples_total"] == 12 and v["nablagfn_reward_mean"] == -0.5
    finally:
        rm.close()


def test_file_sd_document(tmp_path):
    path = write_targets(tmp_path, [
        {"url": "http://10.0.0.2:9401/metrics", "role": "sampler", "index": 1, "node": "10.0.0.2"},
        {"url": "http://10.0.0.1:9400/metrics", "role": "learner", "index": 0, "node": "10.0.0.1"}])
    doc = json.loads(path.read_text())
    assert [g["targets"] for g in doc] == [["10.0.0.1:9400"], ["10.0.0.2:9401"]]
    assert doc[1]["labels"] == {"role": "sampler", "index": "1", "node": "10.0.0.2", "__metrics_path__": "/metrics"}


def test_disabled_records_and_serves_nothing():
    rm = RoleMetrics("reward", 0, enabled=False, node="n1")
    assert rm.serve("127.0.0.1", (9600, 9699)) is None
    rm.sync({"scored": 5})
    assert rm.registry.get_sample_value("nablagfn_trajectories_total",
                                        {"role": "reward", "index": "0", "node": "n1"}) == 0


def test_bench_metrics_prints_fractions(capsys):
    from nablagfn.cli import main

    rc = main(["bench", "metrics", "--sampler-step-s", "0.5", "--learner-step-s", "2.0", "--repeats", "50"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for role, step in (("sampler", 0.5), ("learner", 2.0)):
        assert out[f"{role}_hook_s"] > 0
        assert out[f"{role}_overhead_fraction"] == pytest.approx(out[f"{role}_hook_s"] / step, rel=1e-12)
