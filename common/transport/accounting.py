"""Exact per-run accounting of trajectory records that survives any actor's death.

Every record a sampler produces ends in exactly one place: trained (acked by the learner after its
checkpoint), dropped as stale, dead-lettered (by a reward worker or the learner), acked as a
redundant copy (duplicate), or still in a stream (undelivered or pending). To make the sum exact
whatever process dies when, each step that moves a record is one Lua script — atomic on the server,
so a process killed between two commands cannot leave a count behind its data:

- `add_counted`: the sampler's XADD (if the stream has room) and `produced += 1`;
- `write_and_ack`: the reward worker's XACK of the trajectory entry, then (only if that XACK took
  it: it was still pending) its XDEL and the XADD of the scored record. A worker that dies before
  this left the entry pending for a reclaim; a second worker (or a retried call after a lost reply)
  finds it already acked and writes nothing, so each trajectory entry becomes at most one scored one;
- `ack_counted(field)`: XACK + XDEL and `field += entries actually acked` (trained, dropped_stale,
  duplicates): an entry acked twice (a restarted learner re-acking its last checkpoint's entries)
  counts once;
- `dead_letter_counted`: XACK + XDEL + XADD to `<stream>:dead` with the reason, and
  `dead_lettered += 1`, again only if the XACK took the entry.

The counters live in one hash (`RunKeys.accounting`), persisted with the rest of Redis (AOF), so
they survive a Redis restart and a resumed run. `read_accounting` adds the streams' depths and
pending counts. All keys of a script are on one Redis (the design's shards are keys of one server).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from .streams import StreamClient, dead_letter_name

FIELDS = ("produced", "scored", "trained", "dropped_stale", "duplicates", "dead_lettered")

_ADD_COUNTED = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'produced', 1)
return id
"""
# KEYS: src stream, dst stream, accounting; ARGV: group, entry id, max depth, payload
# returns 0 = dst full (nothing done), -1 = entry no longer pending (nothing written), else the new id
_WRITE_AND_ACK = """
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
redis.call('XDEL', KEYS[1], ARGV[2])
local id = redis.call('XADD', KEYS[2], '*', 'd', ARGV[4])
redis.call('HINCRBY', KEYS[3], 'scored', 1)
return id
"""
# KEYS: stream, accounting; ARGV: group, field, ids...
_ACK_COUNTED = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
if n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], n) end
return n
"""
# KEYS: stream, dead stream, accounting; ARGV: group, id, maxlen, then field/value pairs
_DEAD_LETTER_COUNTED = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
redis.call('XDEL', KEYS[1], ARGV[2])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('HINCRBY', KEYS[3], 'dead_lettered', 1)
return id
"""


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Accounting:
    """The counted stream operations of one run (see the module docstring) on a StreamClient."""

    def __init__(self, streams: StreamClient, key: str):
        self.streams, self.key = streams, key
        client = streams.conn.client
        self._add = client.register_script(_ADD_COUNTED)
        self._write = client.register_script(_WRITE_AND_ACK)
        self._ack = client.register_script(_ACK_COUNTED)
        self._dead = client.register_script(_DEAD_LETTER_COUNTED)

    def add(self, stream: str, payload: bytes, max_depth: int) -> str | bool:
        """XADD if `stream` holds fewer than `max_depth` entries, counted as produced; the id or False."""
        got = self.streams.conn.call(self._add, keys=[stream, self.key], args=[int(max_depth), payload])
        return False if got is None else _s(got)

    def write_and_ack(self, src: str, group: str, entry_id: str, dst: str, payload: bytes,
                      max_depth: int) -> str | bool | None:
        """Ack `entry_id` of `src` and write `payload` to `dst` in one step: the new id; False when
        `dst` is full (retry later); None when the entry was already acked elsewhere (skip it)."""
        got = self.streams.conn.call(self._write, keys=[src, dst, self.key],
                                     args=[group, entry_id, int(max_depth), payload])
        if isinstance(got, int):
            return False if got == 0 else None
        return _s(got)

    def ack(self, stream: str, group: str, ids: str | Sequence[str], field: str) -> int:
        """XACK + XDEL `ids`; `field` += how many were still pending. Returns that number."""
        if field not in FIELDS:
            raise ValueError(f"accounting field must be one of {FIELDS}, got {field!r}")
        ids = [ids] if isinstance(ids, str) else list(ids)
        if not ids:
            return 0
        return int(self.streams.conn.call(self._ack, keys=[stream, self.key], args=[group, field, *ids]))

    def dead_letter(self, stream: str, group: str, entry_id: str, payload: bytes | None, reason: str) -> bool:
        """Move a pending entry to `<stream>:dead` (fields as StreamClient.dead_letter) and count it;
        False if it was no longer pending (someone else settled it)."""
        fields = [b"d", payload or b"", b"reason", reason.encode(), b"stream", stream.encode(),
                  b"id", entry_id.encode(), b"group", group.encode(), b"ts", repr(time.time()).encode()]
        got = self.streams.conn.call(self._dead, keys=[stream, dead_letter_name(stream), self.key],
                                     args=[group, entry_id, self.streams.dead_letter_max_len, *fields])
        return got is not None

    def counters(self) -> dict[str, int]:
        raw = self.streams.conn.call(self.streams.conn.client.hgetall, self.key) or {}
        got = {_s(k): int(v) for k, v in raw.items()}
        return {f: got.get(f, 0) for f in FIELDS}

    def reset(self) -> None:
        self.streams.conn.call(self.streams.conn.client.delete, self.key)


def read_accounting(acct: Accounting, traj_streams: Sequence[str], scored_streams: Sequence[str],
                    groups: tuple[str, str], trained: int) -> dict[str, int]:
    """The run's accounting block: Redis counters, what is still in the streams (undelivered +
    pending), and `unaccounted` = produced − trained − dropped_stale − dead_lettered − duplicates
    − in_streams, which is 0 when every record is in exactly one place. `trained` is counted by the
    caller from what was actually trained (distinct ids of trained.jsonl); `trained_acked` is the
    learner's acks, equal to it once the learner has stopped."""
    c = acct.counters()
    s = acct.streams
    in_streams = pending = 0
    for streams, group in ((traj_streams, groups[0]), (scored_streams, groups[1])):
        for name in streams:
            in_streams += s.depth(name)
            pending += s.pending(name, group)
    out = {"produced": c["produced"], "trained": int(trained), "trained_acked": c["trained"],
           "dropped_stale": c["dropped_stale"], "dead_lettered": c["dead_lettered"],
           "duplicates": c["duplicates"], "scored": c["scored"], "in_streams": in_streams,
           "undelivered": in_streams - pending, "pending": pending}
    out["unaccounted"] = (out["produced"] - out["trained"] - out["dropped_stale"] - out["dead_lettered"]
                          - out["duplicates"] - out["in_streams"])
    return out


__all__ = ["Accounting", "FIELDS", "read_accounting"]
