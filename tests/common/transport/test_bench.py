from nablagfn.common.transport import bench_transport


def test_bench_transport_smoke():
    """The benchmark runs end to end on a small record (the CLI runs the SD1.5-sized default)."""
    out = bench_transport(3, num_steps=4, kept=2, latent_shape=(4, 8, 8), cond_shape=(7, 16))
    assert out["n"] == 3 and out["record_bytes"] > out["tensor_bytes"] > 0
    assert out["mb_per_s"] > 0 and out["per_record_overhead_ms"] > 0
    for stage in ("encode", "xadd", "xreadgroup", "decode"):
        assert out[f"{stage}_ms_per_record"] > 0
