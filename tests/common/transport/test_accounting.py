"""The counted stream steps (common/transport/accounting.py) on a real embedded Redis: each step
moves an entry and counts it in one server-side script, so repeating a step (a retried call after
a lost reply, a second worker, a restarted learner re-acking) neither duplicates data nor counts."""
from nablagfn.common.transport import StreamClient
from nablagfn.common.transport.accounting import Accounting, read_accounting

TRAJ, SCORED, ACCT = "stream:traj", "stream:scored", "accounting"


def _setup(server):
    streams = StreamClient.from_url(server.url)
    streams.ensure_group(TRAJ, "reward")
    streams.ensure_group(SCORED, "learner")
    return streams, Accounting(streams, ACCT)


def test_add_is_bounded_and_counted(server):
    streams, acct = _setup(server)
    assert acct.add(TRAJ, b"a", max_depth=2) and acct.add(TRAJ, b"b", max_depth=2)
    assert acct.add(TRAJ, b"c", max_depth=2) is False  # full: nothing added, nothing counted
    assert streams.depth(TRAJ) == 2 and acct.counters()["produced"] == 2
    streams.close()


def test_write_and_ack_moves_an_entry_once(server):
    streams, acct = _setup(server)
    acct.add(TRAJ, b"t", max_depth=10)
    ((eid, _),) = streams.read(TRAJ, "reward", "reward-0")
    assert acct.write_and_ack(TRAJ, "reward", eid, SCORED, b"s", max_depth=0) is False  # scored full: untouched
    assert streams.pending(TRAJ, "reward") == 1 and streams.depth(SCORED) == 0
    assert acct.write_and_ack(TRAJ, "reward", eid, SCORED, b"s", max_depth=10)
    # again (a retry after a lost reply, or a second worker that reclaimed it): skipped, no copy
    assert acct.write_and_ack(TRAJ, "reward", eid, SCORED, b"s", max_depth=10) is None
    assert streams.depth(TRAJ) == 0 and streams.depth(SCORED) == 1 and acct.counters()["scored"] == 1
    streams.close()


def test_acks_and_dead_letters_count_each_entry_once(server):
    streams, acct = _setup(server)
    for p in (b"1", b"2", b"3"):
        acct.add(SCORED, p, max_depth=10)
    (a, _), (b, _), (c, _) = streams.read(SCORED, "learner", "learner", count=3)
    assert acct.ack(SCORED, "learner", [a, b], "trained") == 2
    assert acct.ack(SCORED, "learner", [a, b], "trained") == 0  # re-acked at a resume: counted once
    assert acct.dead_letter(SCORED, "learner", c, b"3", "bad") is True
    assert acct.dead_letter(SCORED, "learner", c, b"3", "bad") is False
    assert [d["reason"] for d in streams.dead_letters(SCORED)] == ["bad"]
    block = read_accounting(acct, [TRAJ], [SCORED], ("reward", "learner"), trained=2)
    assert block["produced"] == 3 and block["trained_acked"] == 2 and block["dead_lettered"] == 1
    assert block["in_streams"] == 0 and block["unaccounted"] == 0
    acct.add(TRAJ, b"4", max_depth=10)  # one more, still queued: accounted as in_streams
    block = read_accounting(acct, [TRAJ], [SCORED], ("reward", "learner"), trained=2)
    assert block["in_streams"] == block["undelivered"] == 1 and block["unaccounted"] == 0
    block = read_accounting(acct, [TRAJ], [SCORED], ("reward", "learner"), trained=1)
    assert block["unaccounted"] == 1  # a trained record missing from trained.jsonl shows
    streams.close()
