import threading
import time
from urllib.parse import quote

import pytest
import redis

from nablagfn.common.config import RedisConfig
from nablagfn.common.config_io import ConfigError
from nablagfn.common.transport import (RedisConnection, RetryPolicy, StreamClient,
                                       TransportError, redacted_url, start_embedded_redis)

SECRET = "s3cr%t:p@ss"


@pytest.mark.parametrize("url,expected", [
    ("redis://alice:pw@host:6379/0", "redis://alice:***@host:6379/0"),
    ("rediss://:pw@host:6380", "rediss://***@host:6380"),
    ("redis://pw@host", "redis://***@host"),
    ("unix://bob:pw@/tmp/r.sock?db=1&password=pw", "unix://bob:***@/tmp/r.sock?db=1&password=***"),
    ("redis://host:6379", "redis://host:6379"),
    ("rediss://host?ssl_ca_certs=/etc/ca.pem", "rediss://host?ssl_ca_certs=/etc/ca.pem"),
])
def test_redacted_url(url, expected):
    assert redacted_url(url) == expected


def test_acl_user_and_password_never_leak(server, raw):
    raw.execute_command("ACL", "SETUSER", "sampler", "on", f">{SECRET}", "~*", "&*", "+@all")
    path = server.socket
    good = f"unix://sampler:{quote(SECRET, safe='')}@{path}"
    with StreamClient.from_url(good) as client:
        assert client.conn.client.acl_whoami() in ("sampler", b"sampler")
        assert SECRET not in repr(client.conn) and "***" in client.conn.name
    bad = f"unix://sampler:{quote('wrong' + SECRET, safe='')}@{path}"
    with pytest.raises(TransportError, match="refused the credentials") as err:
        RedisConnection.from_url(bad)
    assert "sampler:***@" in str(err.value) and SECRET not in str(err.value)
    assert quote(SECRET, safe="") not in str(err.value)


def test_unreachable_url_fails_fast_naming_redacted_url(tmp_path):
    url = f"unix://u:{quote(SECRET, safe='')}@{tmp_path}/nothing.sock"
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="unreachable after 3 attempt") as err:
        RedisConnection.from_url(url, retry=RetryPolicy(2, 0.01, 0.02))
    assert time.monotonic() - t0 < 2
    assert f"unix://u:***@{tmp_path}/nothing.sock" in str(err.value)
    assert SECRET not in str(err.value) and quote(SECRET, safe="") not in str(err.value)
    with pytest.raises(TransportError, match=r"redis://127\.0\.0\.1:1"):
        RedisConnection.from_url("redis://127.0.0.1:1/0", retry=RetryPolicy(1, 0.01, 0.01))
    with pytest.raises(ValueError, match="invalid Redis URL"):
        RedisConnection.from_url("http://user:pw@host")


def test_retry_rides_out_a_server_restart(tmp_path):
    first = start_embedded_redis(tmp_path / "r")
    conn = RedisConnection.from_url(first.url, retry=RetryPolicy(10, 0.05, 0.2))
    conn.client.set("k", b"v")
    first.stop()
    servers = []
    restart = threading.Timer(0.3, lambda: servers.append(start_embedded_redis(tmp_path / "r")))
    restart.start()
    try:
        assert conn.call(conn.client.get, "k") == b"v"  # retried until the server was back
    finally:
        restart.join()
        conn.close()
        for s in servers:
            s.stop()
    assert servers and servers[0].url == first.url  # the socket path is stable


def test_existing_client_and_tls_url(server):
    client = redis.Redis(unix_socket_path=server.socket)
    try:
        with StreamClient(client) as streams:
            assert streams.ensure_group("s", "g")
            assert streams.conn.name == f"unix://{server.socket}"
        assert client.ping()  # an injected client is not closed by us
    finally:
        client.close()
    text = redis.Redis(unix_socket_path=server.socket, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisConnection(text)
    text.close()
    tls = RedisConnection.from_url("rediss://u:pw@redis.example:6380/0?ssl_cert_reqs=none",
                                   check=False)
    assert tls.client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert tls.name == "rediss://u:***@redis.example:6380/0?ssl_cert_reqs=none"
    tls.close()


def test_from_config(server):
    cfg = RedisConfig(url=None, retries=1, backoff_s=0.01, backoff_max_s=0.01,
                      dead_letter_max_len=5)
    with pytest.raises(ValueError, match="no Redis URL"):
        RedisConnection.from_config(cfg)
    with StreamClient.from_config(cfg, url=server.url) as streams:
        assert streams.dead_letter_max_len == 5 and streams.conn.retry.retries == 1
        assert streams.conn.ping()


@pytest.mark.parametrize("field,value", [("num_shards", 0), ("retries", -1), ("backoff_s", -1.0),
                                         ("backoff_max_s", 0.001), ("socket_timeout_s", 0.0),
                                         ("lora_keep_versions", 0), ("dead_letter_max_len", 0),
                                         ("max_lora_bytes", 10), ("connect_timeout_s", 0.0)])
def test_redis_config_validation(field, value):
    RedisConfig().validate()
    with pytest.raises(ConfigError, match=field):
        RedisConfig(**{field: value}).validate()
