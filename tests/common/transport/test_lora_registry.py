import json
import struct

import pytest
import torch

from nablagfn.common.transport import LoraRegistry, RecordError, shapes_of, verify_safetensors


def _lora(seed=0, rank=4):
    g = torch.Generator().manual_seed(seed)
    return {"unet.down.to_q.lora_A.weight": torch.randn(rank, 32, generator=g),
            "unet.down.to_q.lora_B.weight": torch.randn(32, rank, generator=g),
            "unet.mid.to_k.lora_A.weight": torch.randn(rank, 16, generator=g).to(torch.bfloat16),
            "unet.mid.to_k.lora_B.weight": torch.randn(16, rank, generator=g).half()}


def _assert_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_publish_fetch_round_trip_and_latest(raw):
    reg = LoraRegistry(raw)
    assert reg.latest_version() is None
    with pytest.raises(RecordError, match="nothing published"):
        reg.fetch()
    sd = _lora(0)
    assert reg.publish(sd, metadata={"lora_alpha": "8", "r": "4"}) == 0
    assert reg.latest_version() == 0
    v, back, meta = reg.fetch_with_metadata(expected=shapes_of(sd))
    assert v == 0 and meta == {"lora_alpha": "8", "r": "4"}
    _assert_equal(sd, back)
    assert reg.publish(_lora(1)) == 1 and reg.latest_version() == 1
    _assert_equal(_lora(1), reg.fetch())
    _assert_equal(sd, reg.fetch(0))
    assert reg.publish(_lora(2), version=10) == 10
    with pytest.raises(ValueError, match="newer than the latest 10"):
        reg.publish(_lora(3), version=10)


def test_fetch_if_newer(raw):
    reg = LoraRegistry(raw)
    assert reg.fetch_if_newer(None) is None
    reg.publish(_lora(0))
    v, sd = reg.fetch_if_newer(None)
    assert v == 0
    assert reg.fetch_if_newer(0) is None
    reg.publish(_lora(1))
    v, sd = reg.fetch_if_newer(0, expected=shapes_of(_lora()))
    assert v == 1
    _assert_equal(sd, _lora(1))


def test_pruning_keeps_last_k(raw):
    reg = LoraRegistry(raw, keep=2)
    for i in range(4):
        reg.publish(_lora(i))
    assert reg.versions() == [2, 3] and reg.latest_version() == 3
    assert raw.exists("lora:0") == 0 and raw.exists("lora:1") == 0
    with pytest.raises(RecordError, match="lora:1: not found"):
        reg.fetch(1)
    _assert_equal(_lora(2), reg.fetch(2))


def _blob(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("blob,match", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 10 ** 12) + b"{}", "header length"),
    (struct.pack("<Q", 5) + b"{not}", "not valid JSON"),
    (_blob([1, 2]), "not a JSON object"),
    (_blob({"w": {"dtype": "I16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "key 'w' has dtype 'I16'"),
    (_blob({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     "key 'w': 8 bytes do not match"),
    (_blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8),
     "key 'w' has invalid data_offsets"),
    (_blob({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "key 'w' has an invalid shape"),
    (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "key 'b' overlaps"),
    (_blob({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
     "trailing bytes"),
    (_blob({"__metadata__": {"a": 1}}), "__metadata__"),
])
def test_corrupt_blobs_rejected_before_loading(raw, blob, match):
    raw.set("lora:0", blob)
    raw.set("lora:latest", 0)
    with pytest.raises(RecordError, match=match):
        LoraRegistry(raw).fetch()


def test_wrong_shape_missing_and_unexpected_keys_named(raw):
    reg = LoraRegistry(raw)
    mine = _lora(0, rank=4)
    reg.publish(_lora(1, rank=8))  # a learner with another rank
    with pytest.raises(RecordError, match=r"lora:0: key 'unet.down.to_q.lora_A.weight' has shape "
                                          r"\(8, 32\), expected \(4, 32\)"):
        reg.fetch(expected=shapes_of(mine))
    sd = _lora(2)
    del sd["unet.mid.to_k.lora_B.weight"]
    reg.publish(sd)
    with pytest.raises(RecordError, match="lora:1: missing key 'unet.mid.to_k.lora_B.weight'"):
        reg.fetch(expected=shapes_of(mine))
    sd = {**_lora(3), "extra.weight": torch.zeros(2)}
    reg.publish(sd)
    with pytest.raises(RecordError, match="lora:2: unexpected key 'extra.weight'"):
        reg.fetch(expected=shapes_of(mine))


def test_nan_weights_and_size_limit(raw):
    sd = _lora(0)
    sd["unet.down.to_q.lora_B.weight"][0, 0] = float("nan")
    LoraRegistry(raw).publish(sd)
    with pytest.raises(RecordError, match="key 'unet.down.to_q.lora_B.weight' holds NaN"):
        LoraRegistry(raw).fetch()
    small = LoraRegistry(raw, max_bytes=1024)
    with pytest.raises(RecordError, match="exceeds the limit"):
        small.fetch(0)
    with pytest.raises(RecordError, match="exceeds the limit"):
        small.publish(_lora(1))


def test_verify_safetensors_returns_header():
    from safetensors.torch import save
    blob = save({"w": torch.zeros(2, 3)}, metadata={"k": "v"})
    header = verify_safetensors(blob, 10_000, expected={"w": (2, 3)})
    assert header["w"]["shape"] == [2, 3] and header["__metadata__"] == {"k": "v"}
