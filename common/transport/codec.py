"""msgpack codec for data that crosses a socket: plain values plus tensors, never pickle.

A tensor (numpy array or torch tensor) travels as msgpack ext type `TENSOR_EXT` whose payload is

    u32 little-endian header length | msgpack [dtype: str, shape: list[int]] | raw C-order bytes

with little-endian raw bytes and a dtype from `DTYPES` (a whitelist). bfloat16 has no numpy type,
so it travels as its raw 16 bits under the tag "bfloat16"; decoding to torch gives back the exact
bfloat16 tensor, decoding to numpy gives float32 (exact: bf16 is the top half of an f32).

`decode` trusts nothing: the total size is checked before unpacking, msgpack's own max_*_len
limits bound every container, each tensor's shape × itemsize must equal its byte count before
anything is allocated, and every failure raises `RecordError` (never another exception), so a
consumer can dead-letter the message and keep running.
"""
from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
import torch

from .errors import RecordError

TENSOR_EXT = 1
# wire dtype tag -> little-endian numpy dtype of the raw bytes
DTYPES: dict[str, str] = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "float64": "<f8",
                          "int32": "<i4", "int64": "<i8", "uint8": "|u1", "bool": "|b1"}
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_MAX_HEADER = 1024  # a dtype tag and <= MAX_NDIM ints fit in far less
_MAX_STR = 1 << 20  # meta strings (prompts, ids) are short
_MAX_CONTAINER = 1 << 16  # items in one meta list/map
_U32 = struct.Struct("<I")


def is_tensor(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def dtype_name(x: np.ndarray | torch.Tensor) -> str:
    """The wire tag of a tensor's dtype ("float32", "bfloat16", ...), whitelisted or not."""
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return x.dtype.name


def _as_wire_array(x: np.ndarray | torch.Tensor) -> tuple[str, np.ndarray]:
    """(tag, C-contiguous little-endian numpy array holding the raw bits)."""
    name = dtype_name(x)
    if name not in DTYPES:
        raise RecordError(f"dtype {name} is not allowed on the wire (allowed: {sorted(DTYPES)})")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        x = x.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else x.numpy()
    if x.ndim > MAX_NDIM:
        raise RecordError(f"tensor of rank {x.ndim} exceeds the maximum rank {MAX_NDIM}")
    # asarray(order="C"), not ascontiguousarray: the latter turns 0-d arrays into 1-d ones
    return name, np.asarray(x, dtype=np.dtype(DTYPES[name]), order="C")


def _pack_tensor(x: np.ndarray | torch.Tensor) -> msgpack.ExtType:
    name, arr = _as_wire_array(x)
    header = msgpack.packb([name, list(arr.shape)], use_bin_type=True)
    raw = memoryview(arr.reshape(-1).view(np.uint8))
    return msgpack.ExtType(TENSOR_EXT, b"".join((_U32.pack(len(header)), header, raw)))


def _default(obj: Any) -> Any:
    if is_tensor(obj):
        return _pack_tensor(obj)
    if isinstance(obj, np.generic):  # numpy scalars -> plain Python values
        return obj.item()
    raise TypeError(f"cannot encode a value of type {type(obj).__name__}")


def encode(obj: Any, max_bytes: int | None = None) -> bytes:
    """msgpack bytes of `obj` (dicts, lists, str, int, float, bool, None, bytes, tensors).

    With `max_bytes`, a result larger than it raises RecordError, so a producer finds out before
    sending a message every consumer would reject."""
    try:
        data = msgpack.packb(obj, default=_default, use_bin_type=True)
    except RecordError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise RecordError(f"cannot encode: {exc}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise RecordError(f"encoded message of {len(data)} bytes exceeds the limit of {max_bytes}")
    return data


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _unpack_tensor(payload: bytes, as_torch: bool) -> np.ndarray | torch.Tensor:
    if len(payload) < _U32.size:
        raise RecordError("tensor payload is shorter than its header length")
    (hlen,) = _U32.unpack_from(payload)
    if hlen > _MAX_HEADER or hlen > len(payload) - _U32.size:
        raise RecordError(f"tensor header length {hlen} is invalid")
    try:
        header = msgpack.unpackb(payload[_U32.size:_U32.size + hlen], raw=False, use_list=True,
                                 max_str_len=32, max_bin_len=0, max_array_len=MAX_NDIM,
                                 max_map_len=0, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - any malformed header is a bad record
        raise RecordError(f"malformed tensor header: {exc}") from None
    if not (isinstance(header, list) and len(header) == 2 and isinstance(header[0], str)
            and isinstance(header[1], list)):
        raise RecordError("tensor header must be [dtype, shape]")
    name, shape = header
    if name not in DTYPES:
        raise RecordError(f"tensor dtype {name!r} is not allowed (allowed: {sorted(DTYPES)})")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise RecordError(f"tensor shape {shape!r} must be non-negative integers")
    wire = np.dtype(DTYPES[name])
    raw = memoryview(payload)[_U32.size + hlen:]
    need = math.prod(shape) * wire.itemsize
    if need != len(raw):
        raise RecordError(f"tensor {name}{list(shape)} needs {need} bytes, got {len(raw)}")
    # frombuffer is a view of the message; the copy owns its (native-order, writable) memory
    arr = np.frombuffer(raw, dtype=wire).reshape(shape).astype(wire.newbyteorder("="))
    if name == "bfloat16":
        if as_torch:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return _bf16_bits_to_f32(arr)
    return torch.from_numpy(arr) if as_torch else arr


def decode(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES, *,
           as_torch: bool = False) -> Any:
    """The object `encode` packed; tensors come back as numpy arrays (or torch with `as_torch`).

    Raises RecordError, and only RecordError, for anything malformed or over `max_bytes`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise RecordError(f"message of {size} bytes exceeds the limit of {max_bytes}")

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != TENSOR_EXT:
            raise RecordError(f"unknown msgpack ext type {code}")
        return _unpack_tensor(payload, as_torch)

    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               ext_hook=ext_hook,
                               max_str_len=min(size, _MAX_STR), max_bin_len=size,
                               max_array_len=min(size, _MAX_CONTAINER),
                               max_map_len=min(size, _MAX_CONTAINER), max_ext_len=size)
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types; all mean "bad message"
        raise RecordError(f"malformed message: {type(exc).__name__}: {exc}") from None
