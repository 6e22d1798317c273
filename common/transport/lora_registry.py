"""Versioned LoRA weights in Redis: the learner publishes, sampler actors fetch newer versions.

Keys (prefix "lora"): `lora:{v}` the safetensors bytes of version v, `lora:latest` the newest
version number, `lora:versions` a sorted set of the stored versions. `publish` writes the blob,
the index and the pointer and deletes versions beyond the last `keep` in one MULTI/EXEC under
WATCH, so a reader never sees `lora:latest` naming a blob that is not there yet.

A fetched blob is verified before safetensors parses it: total size, the header (8-byte
little-endian length + JSON, within the blob), whitelisted dtypes, byte ranges that match
shape × itemsize and tile the data exactly, and — if the caller passes them — the expected keys
and shapes. Then values must be finite. Any failure raises RecordError naming the key, so a
bad publish can never load garbage (or NaN) into a sampler's policy.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import redis
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .connection import RedisConnection
from .errors import RecordError

ST_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100_000_000  # safetensors' own limit
_FETCH_ATTEMPTS = 3  # a version pruned between reading `latest` and GET: re-read latest


def verify_safetensors(blob: bytes, max_bytes: int, where: str = "blob",
                       expected: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Check a safetensors blob without loading it; returns the parsed header.

    `expected` maps every key that must be present (and no other) to its shape."""
    if len(blob) > max_bytes:
        raise RecordError(f"{where}: {len(blob)} bytes exceeds the limit of {max_bytes}")
    if len(blob) < 8:
        raise RecordError(f"{where}: {len(blob)} bytes is too short for a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n > min(_MAX_HEADER, len(blob) - 8):
        raise RecordError(f"{where}: header length {n} exceeds the blob")
    try:
        header = json.loads(bytes(blob[8:8 + n]))
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise RecordError(f"{where}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise RecordError(f"{where}: __metadata__ must map strings to strings")
    data_len = len(blob) - 8 - n
    ranges = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise RecordError(f"{where}: key {key!r} has no tensor info")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ST_DTYPES:
            raise RecordError(f"{where}: key {key!r} has dtype {dtype!r}, "
                              f"allowed {sorted(ST_DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise RecordError(f"{where}: key {key!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise RecordError(f"{where}: key {key!r} has invalid data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * ST_DTYPES[dtype]:
            raise RecordError(f"{where}: key {key!r}: {offsets[1] - offsets[0]} bytes do not match "
                              f"{dtype}{shape}")
        ranges.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            raise RecordError(f"{where}: key {key!r} overlaps or leaves a gap in the data")
        end = stop
    if end != data_len:
        raise RecordError(f"{where}: {data_len - end} trailing bytes after the last tensor")
    if expected is not None:
        for key in expected:
            if key not in header:
                raise RecordError(f"{where}: missing key {key!r}")
        for key, info in header.items():
            if key not in expected:
                raise RecordError(f"{where}: unexpected key {key!r}")
            if list(info["shape"]) != list(expected[key]):
                raise RecordError(f"{where}: key {key!r} has shape {tuple(info['shape'])}, "
                                  f"expected {tuple(expected[key])}")
    if meta is not None:
        header["__metadata__"] = meta
    return header


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The `expected` argument for fetch: a sampler passes its own adapter's shapes."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


class LoraRegistry:
    """Publish and fetch versioned LoRA state dicts (str -> tensor) as safetensors blobs."""

    def __init__(self, conn: RedisConnection | redis.Redis, *, prefix: str = "lora", keep: int = 3,
                 max_bytes: int = 1024 * 1024 * 1024):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.conn = conn if isinstance(conn, RedisConnection) else RedisConnection(conn)
        self.prefix, self.keep, self.max_bytes = prefix, keep, max_bytes

    @classmethod
    def from_config(cls, conn: RedisConnection | redis.Redis, cfg: Any) -> "LoraRegistry":
        return cls(conn, keep=cfg.lora_keep_versions, max_bytes=cfg.max_lora_bytes)

    def key(self, version: int) -> str:
        return f"{self.prefix}:{int(version)}"

    @property
    def latest_key(self) -> str:
        return f"{self.prefix}:latest"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:versions"

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None,
                metadata: Mapping[str, str] | None = None) -> int:
        """Store `state_dict` as the new latest version (default: latest + 1, or 0 for the first)
        and prune to the last `keep` versions; returns the version. `metadata` (str -> str, e.g.
        the peft adapter config) travels in the safetensors header."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        blob = st_save(tensors, metadata=dict(metadata) if metadata else None)
        if len(blob) > self.max_bytes:
            raise RecordError(f"LoRA blob of {len(blob)} bytes exceeds the limit of "
                              f"{self.max_bytes}")

        def txn(pipe: Any) -> int:
            latest = pipe.get(self.latest_key)
            current = None if latest is None else int(latest)
            new = (0 if current is None else current + 1) if version is None else int(version)
            if new < 0 or (current is not None and new <= current):
                raise ValueError(f"version {new} must be >= 0 and newer than the latest {current}")
            stored = sorted(int(v) for v in pipe.zrange(self.index_key, 0, -1))
            prune = [v for v in stored + [new]][:-self.keep]
            pipe.multi()
            pipe.set(self.key(new), blob)
            pipe.zadd(self.index_key, {str(new): new})
            pipe.set(self.latest_key, new)
            if prune:
                pipe.delete(*[self.key(v) for v in prune])
                pipe.zrem(self.index_key, *[str(v) for v in prune])
            return new

        return self.conn.call(self.conn.client.transaction, txn, self.latest_key, self.index_key,
                              value_from_callable=True)

    def latest_version(self) -> int | None:
        value = self.conn.call(self.conn.client.get, self.latest_key)
        return None if value is None else int(value)

    def versions(self) -> list[int]:
        stored = self.conn.call(self.conn.client.zrange, self.index_key, 0, -1)
        return sorted(int(v) for v in stored)

    def fetch_with_metadata(self, version: int | None = None,
                            expected: Mapping[str, Sequence[int]] | None = None
                            ) -> tuple[int, dict[str, torch.Tensor], dict[str, str]]:
        """(version, state dict, header metadata) of `version` (default: the latest), verified."""
        for _ in range(_FETCH_ATTEMPTS):
            v = self.latest_version() if version is None else int(version)
            if v is None:
                raise RecordError(f"{self.latest_key}: nothing published yet")
            where = self.key(v)
            size = self.conn.call(self.conn.client.strlen, where)
            if size > self.max_bytes:  # checked before transferring the blob
                raise RecordError(f"{where}: {size} bytes exceeds the limit of {self.max_bytes}")
            blob = self.conn.call(self.conn.client.get, where)
            if blob is not None:
                break
            if version is not None:
                raise RecordError(f"{where}: not found (never published or pruned)")
        else:
            raise RecordError(f"{self.prefix}: latest version kept disappearing while fetching")
        header = verify_safetensors(blob, self.max_bytes, where, expected)
        try:
            state = st_load(blob)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise RecordError(f"{where}: safetensors could not load the blob: {exc}") from None
        for key, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise RecordError(f"{where}: key {key!r} holds NaN/Inf")
        return v, state, dict(header.get("__metadata__") or {})

    def fetch(self, version: int | None = None,
              expected: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
        """The verified state dict of `version` (default: the latest)."""
        return self.fetch_with_metadata(version, expected)[1]

    def fetch_if_newer(self, current: int | None,
                       expected: Mapping[str, Sequence[int]] | None = None
                       ) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(version, state dict) when a version newer than `current` is published, else None:
        what a sampler calls between batches."""
        latest = self.latest_version()
        if latest is None or (current is not None and latest <= current):
            return None
        v, state, _ = self.fetch_with_metadata(None, expected)
        return v, state
