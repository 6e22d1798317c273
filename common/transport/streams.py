"""Redis Streams with consumer groups: the at-least-once queue between the components.

Conventions, so that every producer and consumer agrees:
- An entry holds one field `d` with the msgpack record (`records.py`).
- One consumer group per stream (reward workers on stream:traj, the learner on stream:scored).
  `ack` therefore also XDELs the entry: the stream then holds exactly the entries not yet
  acknowledged (undelivered + pending), so XLEN *is* the backlog. That makes the backpressure
  bound meaningful on Redis 6.2 (which has no XINFO GROUPS `lag`) and keeps memory bounded
  without MAXLEN trimming, which would drop unread data. Pass delete=False to keep entries.
- `add` checks the depth and appends in one Lua script, so the bound holds exactly even with
  many producers; it returns False instead of raising when the stream is full so an actor can
  pause and retry.
- Sharding: `stream_name("stream:traj", shard)` -> "stream:traj:{shard}"; `shard_for` maps a key
  to a shard with a stable hash. Nothing here assumes a single stream.
- A bad record goes to `<stream>:dead` with the reason, the original id and group, and is
  acked (and deleted) in the same MULTI, so the consumer moves on.
"""
from __future__ import annotations

import time
import zlib
from typing import Any, Iterable, Sequence

import redis

from .connection import RedisConnection, RetryPolicy

TRAJ_STREAM = "stream:traj"
SCORED_STREAM = "stream:scored"
FIELD = b"d"
_ADD_IF_ROOM = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'd', ARGV[2])
"""
_MAX_RECLAIM_SCANS = 1000


def stream_name(base: str, shard: int | None = None) -> str:
    """`base`, or `base:{shard}` for a sharded stream."""
    return base if shard is None else f"{base}:{int(shard)}"


def shard_for(key: str, num_shards: int) -> int | None:
    """Stable shard of `key` (crc32, the same in every process); None when not sharded."""
    return None if num_shards <= 1 else zlib.crc32(key.encode()) % num_shards


def stream_names(base: str, num_shards: int) -> list[str]:
    """Every shard of `base` (a consumer reads them all)."""
    return [base] if num_shards <= 1 else [stream_name(base, s) for s in range(num_shards)]


def dead_letter_name(stream: str) -> str:
    return f"{stream}:dead"


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def parse_autoclaim_reply(reply: Sequence[Any]) -> tuple[str, list[str], list[str]]:
    """(next cursor, claimed ids, deleted ids) from a raw `XAUTOCLAIM ... JUSTID` reply.

    Redis 6.2 answers [cursor, ids]; Redis 7 adds a third element, the ids that were pending but
    no longer exist (Redis 7 has already removed them from the PEL)."""
    if not isinstance(reply, (list, tuple)) or len(reply) not in (2, 3):
        raise ValueError(f"unexpected XAUTOCLAIM reply: {reply!r}")
    claimed = [_s(i[0] if isinstance(i, (list, tuple)) else i) for i in reply[1] if i is not None]
    deleted = [_s(i) for i in reply[2]] if len(reply) == 3 and reply[2] else []
    return _s(reply[0]), claimed, deleted


class StreamClient:
    """Producer and consumer operations on Redis Streams, all retried through RedisConnection."""

    def __init__(self, conn: RedisConnection | redis.Redis, *, dead_letter_max_len: int = 10_000):
        self.conn = conn if isinstance(conn, RedisConnection) else RedisConnection(conn)
        self.dead_letter_max_len = dead_letter_max_len
        self._add_if_room = self.conn.client.register_script(_ADD_IF_ROOM)
        # XAUTOCLAIM ... JUSTID needs the raw reply: redis-py's parser expects full entries
        self._raw = redis.Redis(connection_pool=self.conn.client.connection_pool)
        self._raw.response_callbacks.pop("XAUTOCLAIM", None)

    @classmethod
    def from_url(cls, url: str, *, retry: RetryPolicy = RetryPolicy(),
                 dead_letter_max_len: int = 10_000, **kw: Any) -> "StreamClient":
        return cls(RedisConnection.from_url(url, retry=retry, **kw),
                   dead_letter_max_len=dead_letter_max_len)

    @classmethod
    def from_config(cls, cfg: Any, url: str | None = None) -> "StreamClient":
        """From a RedisConfig (see RedisConnection.from_config)."""
        return cls(RedisConnection.from_config(cfg, url),
                   dead_letter_max_len=cfg.dead_letter_max_len)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "StreamClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- groups and depth ---------------------------------------------------------------------
    def ensure_group(self, stream: str, group: str, start_id: str = "0") -> bool:
        """Create `group` on `stream` (and the stream); True if created, False if it existed."""
        try:
            self.conn.call(self.conn.client.xgroup_create, stream, group, id=start_id,
                           mkstream=True)
            return True
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise

    def depth(self, stream: str) -> int:
        """Entries in the stream: with ack(delete=True), the un-acknowledged backlog."""
        return int(self.conn.call(self.conn.client.xlen, stream))

    def pending(self, stream: str, group: str) -> int:
        """Entries delivered to a consumer of `group` but not acknowledged."""
        return int(self.conn.call(self.conn.client.xpending, stream, group)["pending"])

    # -- produce ------------------------------------------------------------------------------
    def add(self, stream: str, payload: bytes, max_depth: int) -> str | bool:
        """Append `payload`; the new entry id, or False when the stream already holds
        `max_depth` entries (backpressure: the producer should pause and retry)."""
        entry = self.conn.call(self._add_if_room, keys=[stream], args=[int(max_depth), payload])
        return False if entry is None else _s(entry)

    # -- consume ------------------------------------------------------------------------------
    def read_many(self, streams: Iterable[str], group: str, consumer: str, count: int = 1,
                  block_ms: int | None = None) -> list[tuple[str, str, bytes]]:
        """New entries for `consumer` from any of `streams`: (stream, id, payload) triples.
        block_ms None or <= 0 does not block (Redis' BLOCK 0 would block forever)."""
        block = int(block_ms) if block_ms and block_ms > 0 else None
        reply = self.conn.call(self.conn.client.xreadgroup, group, consumer,
                               {s: ">" for s in streams}, count=count, block=block)
        out = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                if entry_id is not None:
                    out.append((_s(stream), _s(entry_id), (fields or {}).get(FIELD, b"")))
        return out

    def read(self, stream: str, group: str, consumer: str, count: int = 1,
             block_ms: int | None = None) -> list[tuple[str, bytes]]:
        """New entries for `consumer`: (id, payload) pairs, now pending until acked."""
        return [(i, p) for _, i, p in self.read_many([stream], group, consumer, count, block_ms)]

    def ack(self, stream: str, group: str, ids: str | Sequence[str], delete: bool = True) -> int:
        """Acknowledge (and by default delete) entries once their result is durably written
        downstream; returns how many were pending."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        if not ids:
            return 0

        def run() -> int:
            pipe = self.conn.client.pipeline(transaction=True)
            pipe.xack(stream, group, *ids)
            if delete:
                pipe.xdel(stream, *ids)
            return int(pipe.execute()[0])

        return self.conn.call(run)

    def reclaim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                count: int = 10) -> list[tuple[str, bytes]]:
        """Take over up to `count` entries pending longer than `min_idle_ms` (a dead or stuck
        consumer's), as (id, payload) pairs now pending on `consumer`.

        Claims ids with XAUTOCLAIM JUSTID, then reads them: Redis 6.2 returns a deleted entry
        as a bare nil without its id, which would leave it pending forever; with ids in hand, a
        claimed entry that no longer exists is simply acked."""
        claimed: list[str] = []
        cursor = "0-0"
        for _ in range(_MAX_RECLAIM_SCANS):
            reply = self.conn.call(self._raw.execute_command, "XAUTOCLAIM", stream, group,
                                   consumer, int(min_idle_ms), cursor, "COUNT",
                                   count - len(claimed), "JUSTID")
            cursor, ids, _deleted = parse_autoclaim_reply(reply)
            claimed += ids
            if cursor == "0-0" or len(claimed) >= count:
                break
        if not claimed:
            return []

        def fetch() -> list[Any]:
            pipe = self.conn.client.pipeline(transaction=False)
            for entry_id in claimed:
                pipe.xrange(stream, entry_id, entry_id)
            return pipe.execute()

        out, gone = [], []
        for entry_id, found in zip(claimed, self.conn.call(fetch)):
            if found:
                out.append((entry_id, (found[0][1] or {}).get(FIELD, b"")))
            else:
                gone.append(entry_id)
        if gone:
            self.ack(stream, group, gone, delete=False)
        return out

    # -- failures -----------------------------------------------------------------------------
    def dead_letter(self, stream: str, group: str, entry_id: str, payload: bytes | None,
                    reason: str) -> str:
        """Move a bad entry to `<stream>:dead` with `reason` and its original id, and ack (and
        delete) the original, in one MULTI; returns the dead-letter entry id."""
        fields = {b"d": payload or b"", b"reason": reason.encode(), b"stream": stream.encode(),
                  b"id": entry_id.encode(), b"group": group.encode(),
                  b"ts": repr(time.time()).encode()}

        def run() -> str:
            pipe = self.conn.client.pipeline(transaction=True)
            pipe.xadd(dead_letter_name(stream), fields, maxlen=self.dead_letter_max_len,
                      approximate=True)
            pipe.xack(stream, group, entry_id)
            pipe.xdel(stream, entry_id)
            return _s(pipe.execute()[0])

        return self.conn.call(run)

    def dead_letters(self, stream: str, count: int = 100) -> list[dict[str, Any]]:
        """The oldest `count` dead letters of `stream`:
        dicts of dead_id, id (the original), reason, group, ts, payload."""
        rows = self.conn.call(self.conn.client.xrange, dead_letter_name(stream), count=count)
        return [{"dead_id": _s(i), "id": _s(f.get(b"id", b"")), "reason": _s(f.get(b"reason", b"")),
                 "group": _s(f.get(b"group", b"")), "ts": float(f.get(b"ts", b"0")),
                 "payload": f.get(b"d", b"")} for i, f in rows]
