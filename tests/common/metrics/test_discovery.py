"""File-based service discovery against a real (embedded) Redis: the driver's TargetsWriter keeps
prometheus_targets.json equal to the registered endpoints — a restarted actor that registers again
on a new port replaces its old target (one entry per role and index), unchanged endpoints do not
rewrite the file, and the end of the run leaves an empty target list."""
import json

from nablagfn.common.config import DistributedConfig
from nablagfn.common.metrics.discovery import TARGETS_FILE, TargetsWriter, register_endpoint
from nablagfn.common.transport import StreamClient
from nablagfn.common.transport.keys import RunKeys


def _targets(run_dir):
    return [(g["labels"]["role"], g["labels"]["index"], g["targets"][0])
            for g in json.loads((run_dir / TARGETS_FILE).read_text())]


def test_targets_follow_a_restarted_actor(server, tmp_path):
    client = StreamClient.from_url(server.url)
    keys = RunKeys.from_config(DistributedConfig())
    writer = TargetsWriter(client.conn, keys, tmp_path)
    try:
        writer.reset()
        register_endpoint(client.conn, keys, {"url": "http://10.0.0.1:9400/metrics", "role": "sampler", "index": 0,
                                              "node": "10.0.0.1"})
        register_endpoint(client.conn, keys, {"url": "http://10.0.0.2:9400/metrics", "role": "learner", "index": 0,
                                              "node": "10.0.0.2"})
        assert writer.refresh()
        assert _targets(tmp_path) == [("learner", "0", "10.0.0.2:9400"), ("sampler", "0", "10.0.0.1:9400")]
        assert not writer.refresh()  # nothing changed: the file is not rewritten
        # sampler-0 died; Ray restarted it on another node and port: it registers again
        register_endpoint(client.conn, keys, {"url": "http://10.0.0.3:9401/metrics", "role": "sampler", "index": 0,
                                              "node": "10.0.0.3"})
        assert writer.refresh()
        assert _targets(tmp_path) == [("learner", "0", "10.0.0.2:9400"), ("sampler", "0", "10.0.0.3:9401")]
        writer.clear()
        assert _targets(tmp_path) == []
    finally:
        client.close()
