import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nablagfn.common.transport import DTYPES, TENSOR_EXT, RecordError, decode, encode

NUMPY_DTYPES = [d for d in DTYPES if d != "bfloat16"]
SHAPES = [(3, 4), (), (0,), (0, 5), (2, 1, 3)]


def _numpy(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return np.asarray(rng.random(shape) > 0.5)
    if dtype.startswith("float"):
        return np.asarray(rng.standard_normal(shape), dtype=dtype)
    return np.asarray(rng.integers(-100 if dtype.startswith("int") else 0, 100, size=shape),
                      dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip_every_dtype(dtype, shape):
    a = _numpy(dtype, shape)
    out = decode(encode({"a": a, "meta": [1, "x", 2.5, True, None]}))
    assert out["meta"] == [1, "x", 2.5, True, None]
    assert out["a"].dtype == a.dtype and out["a"].shape == a.shape
    np.testing.assert_array_equal(out["a"], a)
    assert out["a"].flags.writeable


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_torch_round_trip_every_dtype(dtype, shape):
    t = torch.from_numpy(_numpy(dtype, shape))
    out = decode(encode(t), as_torch=True)
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(out, t)


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_travels_as_raw_bits(shape):
    t = torch.randn(shape).to(torch.bfloat16)
    msg = encode(t)
    back = decode(msg, as_torch=True)
    assert back.dtype == torch.bfloat16 and back.shape == t.shape
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))  # bit-exact
    as_np = decode(msg)  # numpy has no bfloat16: exact float32 values
    assert as_np.dtype == np.float32
    np.testing.assert_array_equal(as_np, t.float().numpy())


def test_non_contiguous_big_endian_and_grad_inputs():
    a = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(decode(encode(a)), a)
    t = torch.randn(4, 3, requires_grad=True).t()
    assert torch.equal(decode(encode(t), as_torch=True), t.detach())


def test_numpy_scalars_become_plain_values():
    assert decode(encode({"x": np.float32(1.5), "b": np.bool_(True), "i": np.int64(7)})) == {
        "x": 1.5, "b": True, "i": 7}


@pytest.mark.parametrize("bad", [np.zeros(2, np.complex64), np.zeros(2, np.int16),
                                 torch.zeros(2, dtype=torch.int8), np.zeros(2, object), {1, 2}])
def test_encode_rejects_what_is_not_whitelisted(bad):
    with pytest.raises(RecordError):
        encode({"x": bad})


def test_oversize_rejected_before_unpacking():
    msg = encode({"a": np.zeros(1000, np.float32)})
    with pytest.raises(RecordError, match="exceeds the limit"):
        decode(msg, max_bytes=len(msg) - 1)
    # garbage that is also oversize: the size check answers first, nothing is parsed
    with pytest.raises(RecordError, match="exceeds the limit"):
        decode(b"\xc1" * 5000, max_bytes=4096)
    with pytest.raises(RecordError, match="exceeds the limit"):
        encode({"a": np.zeros(1000, np.float32)}, max_bytes=100)


def test_container_length_limits_apply_before_allocation():
    # an array header claiming 2**31-1 items inside a 5-byte message
    with pytest.raises(RecordError):
        decode(b"\xdd\x7f\xff\xff\xff")
    with pytest.raises(RecordError):  # a bin claiming 4 GiB
        decode(b"\xc6\xff\xff\xff\xff" + b"x" * 10)


def _ext(header, raw=b""):
    h = msgpack.packb(header)
    return msgpack.packb(msgpack.ExtType(TENSOR_EXT, len(h).to_bytes(4, "little") + h + raw))


@pytest.mark.parametrize("msg,match", [
    (_ext(["float32", [2 ** 40, 2 ** 40]], b"\0" * 8), "needs"),  # shape × itemsize ≠ bytes
    (_ext(["float32", [3]], b"\0" * 8), "needs"),
    (_ext(["complex64", [1]], b"\0" * 8), "not allowed"),
    (_ext(["float32", [-1]], b""), "non-negative"),
    (_ext(["float32", [True]], b"\0" * 4), "non-negative"),
    (_ext(["float32"]), r"\[dtype, shape\]"),
    (_ext(["float32", [1] * 9]), "malformed tensor header"),
    (msgpack.packb(msgpack.ExtType(7, b"abc")), "unknown msgpack ext"),
    (msgpack.packb(msgpack.ExtType(TENSOR_EXT, b"\xff\xff\xff\xff")), "header length"),
    (msgpack.packb({1: 2}), "malformed"),  # non-string map key
    (b"\x93\x01", "malformed"),  # truncated
    (msgpack.packb(1) + b"\x01", "malformed"),  # trailing data
])
def test_malformed_tensors_raise_record_error(msg, match):
    with pytest.raises(RecordError, match=match):
        decode(msg)


def test_decode_rejects_non_bytes():
    with pytest.raises(RecordError):
        decode("a string")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(NUMPY_DTYPES),
       shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
       seed=st.integers(0, 2 ** 16))
def test_round_trip_property(dtype, shape, seed):
    a = _numpy(dtype, shape, seed)
    b = decode(encode([a]))[0]
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
