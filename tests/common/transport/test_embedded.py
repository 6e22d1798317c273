import os

import psutil
import pytest
import torch

from nablagfn.common.transport import LoraRegistry, StreamClient, start_embedded_redis

S, G = "stream:scored", "learner"


def test_restart_keeps_acked_state_and_registry(tmp_path):
    data = tmp_path / "run" / "redis"
    server = start_embedded_redis(data)
    streams = StreamClient.from_url(server.url)
    reg = LoraRegistry(streams.conn, keep=2)
    sd = {"a": torch.randn(3, 4), "b": torch.randn(4).half()}
    try:
        assert streams.conn.client.config_get("appendonly") == {"appendonly": "yes"}
        streams.ensure_group(S, G)
        ids = [streams.add(S, b"r%d" % i, max_depth=10) for i in range(4)]
        got = streams.read(S, G, "learner-0", count=3)
        streams.ack(S, G, got[0][0])  # acked: gone for good
        streams.dead_letter(S, G, got[1][0], got[1][1], "bad")  # dead-lettered
        # got[2] stays pending on learner-0, ids[3] is undelivered
        reg.publish({k: v + 1 for k, v in sd.items()})
        reg.publish(sd)
    finally:
        streams.close()
        server.stop()
    assert not server.running and not os.path.exists(server.socket)
    assert (data / "appendonly.aof").stat().st_size > 0

    again = start_embedded_redis(data)
    streams = StreamClient.from_url(again.url)
    try:
        reg = LoraRegistry(streams.conn, keep=2)
        assert streams.ensure_group(S, G) is False  # the group survived
        assert streams.depth(S) == 2 and streams.pending(S, G) == 1
        [entry] = streams.conn.client.xpending_range(S, G, "-", "+", 10)
        assert entry["message_id"].decode() == got[2][0] and entry["consumer"] == b"learner-0"
        assert streams.read(S, G, "learner-1", count=10) == [(ids[3], b"r3")]
        assert [d["reason"] for d in streams.dead_letters(S)] == ["bad"]
        assert reg.latest_version() == 1 and reg.versions() == [0, 1]
        back = reg.fetch()
        assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    finally:
        streams.close()
        again.stop()


def test_second_server_on_a_live_dir_refused_and_stop_idempotent(tmp_path):
    server = start_embedded_redis(tmp_path / "r")
    pid = server.pid
    try:
        with pytest.raises(RuntimeError, match="already serves"):
            start_embedded_redis(tmp_path / "r")
        client = server.client()  # a connected client does not keep the server alive
    finally:
        server.stop()
    client.close()
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "r" / "redis.db.settings").exists()


def test_long_directory_falls_back_to_a_temp_socket(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with start_embedded_redis(deep) as server:
        assert len(server.socket) < 100 and not server.socket.startswith(str(deep))
        client = server.client()
        assert client.ping()
        client.close()
        sock_dir = os.path.dirname(server.socket)
    assert not os.path.exists(sock_dir)
