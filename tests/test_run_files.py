"""metrics.jsonl / trained.jsonl exactly once (nablagfn/run_files.py): a learner's start event drops
the rows its dead incarnation wrote after its checkpoint; rows already written are not written again."""
import json

from nablagfn.run_files import RunFiles


def _row(u):
    return {"update": u, "version": u, "trained_at_version": u - 1, "reward_mean": 0.0,
            "traj_ids": [f"t{u}a", f"t{u}b"], "sampled_versions": [u - 1, u - 1]}


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_start_event_truncates_and_rows_are_written_once(tmp_path):
    f = RunFiles(tmp_path, fresh=True)
    assert [f.handle(_row(u)) for u in (1, 2, 3)] == [True, True, True]
    assert f.handle({"event": "start", "update": 1}) is False  # the learner resumed at update 1
    assert [m["update"] for m in _lines(tmp_path / "metrics.jsonl")] == [1]
    assert [t["traj_id"] for t in _lines(tmp_path / "trained.jsonl")] == ["t1a", "t1b"]
    assert f.truncations == [{"resumed_at": 1, "dropped_updates": 2}]
    redo = {**_row(2), "traj_ids": ["r2a", "r2b"]}
    assert f.handle(redo) and not f.handle(_row(1))  # update 1 is already there
    f.save_cursor("5-0")
    f.close()
    again = RunFiles(tmp_path, fresh=False)  # a resumed driver
    assert again.cursor() == "5-0" and again.last_update == 2 and not again.handle(_row(2))
    assert again.trained_ids() == ["t1a", "t1b", "r2a", "r2b"]
    again.close()
    assert RunFiles(tmp_path, fresh=True).rows == [] and not (tmp_path / "metrics.cursor").exists()
