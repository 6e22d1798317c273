import time

import pytest

from nablagfn.common.transport import (RecordError, ScoredRecord, TrajectoryRecord,
                                       dead_letter_name, parse_autoclaim_reply, shard_for,
                                       stream_name, stream_names)

S, G = "stream:traj", "rewards"


def test_add_read_ack(streams):
    assert streams.ensure_group(S, G) is True
    assert streams.ensure_group(S, G) is False  # BUSYGROUP tolerated
    ids = [streams.add(S, b"p%d" % i, max_depth=10) for i in range(3)]
    assert all(isinstance(i, str) for i in ids)
    got = streams.read(S, G, "w1", count=10)
    assert got == [(ids[0], b"p0"), (ids[1], b"p1"), (ids[2], b"p2")]
    assert streams.read(S, G, "w1", count=10) == []  # nothing new
    assert streams.pending(S, G) == 3
    assert streams.ack(S, G, [i for i, _ in got[:2]]) == 2
    assert streams.pending(S, G) == 1 and streams.depth(S) == 1  # acked entries are deleted
    assert streams.ack(S, G, got[2][0], delete=False) == 1
    assert streams.pending(S, G) == 0 and streams.depth(S) == 1
    assert streams.ack(S, G, []) == 0


def test_binary_payload_intact(streams):
    streams.ensure_group(S, G)
    payload = bytes(range(256)) * 100
    streams.add(S, payload, max_depth=5)
    assert streams.read(S, G, "w")[0][1] == payload


def test_backpressure_returns_false_over_the_bound(streams):
    streams.ensure_group(S, G)
    assert streams.add(S, b"a", max_depth=2)
    assert streams.add(S, b"b", max_depth=2)
    assert streams.add(S, b"c", max_depth=2) is False  # full: no exception, nothing added
    assert streams.depth(S) == 2
    [(entry_id, _)] = streams.read(S, G, "w", count=1)
    assert streams.add(S, b"c", max_depth=2) is False  # read but not acked still counts
    streams.ack(S, G, entry_id)
    assert streams.add(S, b"c", max_depth=2)
    assert [p for _, p in streams.read(S, G, "w", count=5)] == [b"b", b"c"]


def test_blocking_read_times_out_empty(streams):
    streams.ensure_group(S, G)
    t0 = time.monotonic()
    assert streams.read(S, G, "w", count=1, block_ms=100) == []
    assert 0.08 <= time.monotonic() - t0 < 2


def test_reclaim_from_a_consumer_that_did_not_ack(streams):
    streams.ensure_group(S, G)
    for i in range(3):
        streams.add(S, b"m%d" % i, max_depth=10)
    taken = streams.read(S, G, "dead-worker", count=2)  # reads, then "dies" without acking
    assert streams.reclaim(S, G, "w2", min_idle_ms=60_000) == []  # not idle long enough
    time.sleep(0.05)
    got = streams.reclaim(S, G, "w2", min_idle_ms=20, count=10)
    assert got == taken
    owners = {p["consumer"] for p in streams.conn.client.xpending_range(S, G, "-", "+", 10)}
    assert owners == {b"w2"}
    streams.ack(S, G, [i for i, _ in got])
    assert streams.pending(S, G) == 0
    assert streams.read(S, G, "w2", count=5)[0][1] == b"m2"  # the unread one is still there


def test_reclaim_respects_count_and_skips_deleted_entries(streams, raw):
    streams.ensure_group(S, G)
    ids = [streams.add(S, b"x%d" % i, max_depth=10) for i in range(5)]
    streams.read(S, G, "dead-worker", count=5)
    raw.xdel(S, ids[1])  # trimmed away while pending: Redis 6.2 replies nil for it
    time.sleep(0.03)
    first = streams.reclaim(S, G, "w2", min_idle_ms=10, count=2)
    assert [i for i, _ in first] == [ids[0]]  # ids[1] was claimed too, found gone and acked
    rest = streams.reclaim(S, G, "w2", min_idle_ms=0, count=10)
    assert {i for i, _ in rest} == {ids[0], ids[2], ids[3], ids[4]}
    assert streams.pending(S, G) == 4


def test_parse_autoclaim_reply_both_versions():
    # Redis 6.2: [cursor, ids]; Redis 7: [cursor, ids, deleted ids]
    assert parse_autoclaim_reply([b"0-0", [b"1-0", b"2-0"]]) == ("0-0", ["1-0", "2-0"], [])
    assert parse_autoclaim_reply([b"5-0", [b"1-0"], [b"3-0"]]) == ("5-0", ["1-0"], ["3-0"])
    # full-entry form (without JUSTID), incl. a 6.2 nil for a deleted entry
    assert parse_autoclaim_reply([b"0-0", [[b"1-0", [b"d", b"x"]], None], []]) == (
        "0-0", ["1-0"], [])
    with pytest.raises(ValueError):
        parse_autoclaim_reply([b"0-0"])


def test_dead_letter_holds_reason_and_acks_original(streams):
    streams.ensure_group(S, G)
    streams.add(S, b"garbage", max_depth=10)
    streams.add(S, b"next", max_depth=10)
    [(entry_id, payload)] = streams.read(S, G, "w", count=1)
    dead_id = streams.dead_letter(S, G, entry_id, payload, "tensors.x_t: shape (1,)")
    [letter] = streams.dead_letters(S)
    assert letter["dead_id"] == dead_id and letter["id"] == entry_id
    assert letter["reason"] == "tensors.x_t: shape (1,)" and letter["payload"] == b"garbage"
    assert letter["group"] == G and letter["ts"] > 0
    assert streams.pending(S, G) == 0 and streams.depth(S) == 1
    assert streams.read(S, G, "w", count=1)[0][1] == b"next"  # the consumer keeps going
    assert dead_letter_name(S) == "stream:traj:dead"


def test_records_through_the_stream_bad_ones_dead_lettered(streams, make_traj):
    streams.ensure_group(S, G)
    good = make_traj(latent_dtype="bfloat16")
    bad = make_traj()
    bad.tensors["x_t"] = bad.tensors["x_t"][:2]
    streams.add(S, good.to_msg(), max_depth=10)
    streams.add(S, bad.to_msg(validate=False), max_depth=10)
    streams.add(S, b"\xc1not msgpack", max_depth=10)
    out = []
    for entry_id, payload in streams.read(S, G, "w", count=10):
        try:
            out.append(TrajectoryRecord.from_msg(payload))
            streams.ack(S, G, entry_id)
        except RecordError as exc:
            streams.dead_letter(S, G, entry_id, payload, exc.reason)
    assert len(out) == 1 and out[0].meta == good.meta
    reasons = [d["reason"] for d in streams.dead_letters(S)]
    assert reasons[0].startswith("tensors.x_t: shape") and reasons[1].startswith("malformed")
    assert streams.pending(S, G) == 0 and streams.depth(S) == 0

    import torch
    scored = ScoredRecord.from_trajectory(out[0], log_reward=0.5, reward_name="r",
                                          grad_final=torch.zeros(2, 4, 4))
    assert streams.add("stream:scored", scored.to_msg(), max_depth=10)


def test_sharded_streams(streams):
    assert stream_name("stream:traj") == "stream:traj"
    assert stream_name("stream:traj", 3) == "stream:traj:3"
    assert stream_names("stream:traj", 1) == ["stream:traj"]
    assert stream_names("stream:traj", 2) == ["stream:traj:0", "stream:traj:1"]
    assert shard_for("abc", 1) is None
    shards = {shard_for(f"traj-{i}", 4) for i in range(64)}
    assert shards == {0, 1, 2, 3} and shard_for("traj-7", 4) == shard_for("traj-7", 4)
    names = stream_names("stream:traj", 2)
    for name in names:
        streams.ensure_group(name, G)
        streams.add(name, name.encode(), max_depth=1)
    got = streams.read_many(names, G, "w", count=10)
    assert sorted((s, p) for s, _, p in got) == [(n, n.encode()) for n in names]
