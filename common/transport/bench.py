"""Throughput of the data plane: encode + XADD + XREADGROUP + decode for realistic records.

`bench_transport()` defaults to an SD1.5-sized trajectory (latents 4×64×64 fp16, K=5 kept
transitions with ε_behaviour, ε_pretrained and x̂₀, the full 51-state path, a 77×768 text
embedding: ~2.2 MB) and returns a dict of timings; the CLI prints it. With no URL it starts an
embedded server in a temp dir and stops it afterwards.
"""
from __future__ import annotations

import tempfile
import time
import uuid
from typing import Any

import numpy as np
import torch

from .codec import DEFAULT_MAX_BYTES
from .embedded import start_embedded_redis
from .records import TrajectoryRecord
from .streams import StreamClient

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def synthetic_trajectory(num_steps: int = 50, kept: int = 5,
                         latent_shape: tuple[int, ...] = (4, 64, 64),
                         latent_dtype: str = "float16",
                         cond_shape: tuple[int, int] | None = (77, 768), with_states: bool = True,
                         with_optional: bool = True, seed: int = 0) -> TrajectoryRecord:
    """A valid TrajectoryRecord of random latents with the given sizes (tests and benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    dt = _TORCH_DTYPES[latent_dtype]

    def lat(*lead: int) -> torch.Tensor:
        return torch.randn(*lead, *latent_shape, generator=g).to(dt)

    step_idx = torch.linspace(0, num_steps - 1, kept).round().long()
    tensors: dict[str, Any] = {
        "timesteps": torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * (1000 // num_steps),
        "step_idx": step_idx, "x_t": lat(kept), "x_next": lat(kept), "eps_behaviour": lat(kept),
        "final": lat(),
    }
    if with_optional:
        tensors["eps_pretrained"] = lat(kept)
        tensors["x0_pred"] = lat(kept)
    if with_states:
        tensors["states"] = lat(num_steps + 1)
    if cond_shape is not None:
        tensors["cond_emb"] = torch.randn(*cond_shape, generator=g).to(dt)
    meta = {"run_id": "bench", "traj_id": uuid.uuid4().hex, "policy_version": 0, "prompt_id": 3,
            "prompt": "a photo of a cat", "sampler": "ddim", "num_steps": num_steps}
    return TrajectoryRecord(meta=meta, tensors=tensors)


def _tensor_bytes(record: TrajectoryRecord) -> int:
    return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else np.asarray(t).nbytes
               for t in record.tensors.values())


def _run(client: StreamClient, record: TrajectoryRecord, n: int, batch: int) -> dict[str, float]:
    stream, group = f"bench:{uuid.uuid4().hex[:8]}", "bench"
    client.ensure_group(stream, group)
    t = {"encode": 0.0, "xadd": 0.0, "xreadgroup": 0.0, "decode": 0.0}
    msg = b""
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            msg = record.to_msg()
            t1 = time.perf_counter()
            if not client.add(stream, msg, max_depth=n + 1):
                raise RuntimeError("benchmark stream unexpectedly full")
            t["encode"] += t1 - t0
            t["xadd"] += time.perf_counter() - t1
        got = 0
        while got < n:
            t0 = time.perf_counter()
            entries = client.read(stream, group, "bench", count=batch)
            t1 = time.perf_counter()
            for _, payload in entries:
                TrajectoryRecord.from_msg(payload, max(DEFAULT_MAX_BYTES, len(payload)))
            t["decode"] += time.perf_counter() - t1
            t["xreadgroup"] += t1 - t0
            client.ack(stream, group, [i for i, _ in entries])
            got += len(entries)
    finally:
        client.conn.client.delete(stream)
    t["record_bytes"] = len(msg)
    return t


def bench_transport(n: int = 20, *, url: str | None = None, batch: int = 4,
                    **record_kw: Any) -> dict[str, Any]:
    """Encode → XADD → XREADGROUP → decode (with validation) of `n` records (sizes as in
    `synthetic_trajectory(**record_kw)`) and of `n` tiny records (the fixed per-record cost).

    Returns MB/s of the whole path and per stage, ms per record and per stage, the wire
    overhead over the raw tensor bytes, and the tiny record's round-trip ms."""
    record = synthetic_trajectory(**record_kw)
    tiny = synthetic_trajectory(num_steps=2, kept=1, latent_shape=(1,), cond_shape=None,
                                with_states=False, with_optional=False)
    tmp = None if url else tempfile.TemporaryDirectory(prefix="nablagfn-bench-")
    server = start_embedded_redis(tmp.name) if tmp else None
    client = StreamClient.from_url(url or server.url)
    try:
        _run(client, record, 2, batch)  # warm-up: script load, allocator
        big = _run(client, record, n, batch)
        small = _run(client, tiny, n, batch)
    finally:
        client.close()
        if server:
            server.stop()
        if tmp:
            tmp.cleanup()
    stages = ("encode", "xadd", "xreadgroup", "decode")
    total = sum(big[s] for s in stages)
    mb = big["record_bytes"] * n / 1e6
    out: dict[str, Any] = {
        "n": n, "record_bytes": int(big["record_bytes"]), "tensor_bytes": _tensor_bytes(record),
        "wire_overhead_bytes": int(big["record_bytes"]) - _tensor_bytes(record),
        "total_ms_per_record": 1e3 * total / n, "mb_per_s": mb / total,
        "tiny_record_bytes": int(small["record_bytes"]),
        "per_record_overhead_ms": 1e3 * sum(small[s] for s in stages) / n,
        "server": "embedded" if server else "url",
    }
    for s in stages:
        out[f"{s}_ms_per_record"] = 1e3 * big[s] / n
        out[f"{s}_mb_per_s"] = mb / big[s] if big[s] > 0 else float("inf")
    return out
