"""`metrics.jsonl` and `trained.jsonl` of a distributed run, exactly once across learner restarts
and resumed runs.

The driver feeds every entry of the learner's metrics stream to `RunFiles.handle`:
- an update row is appended (one line to metrics.jsonl; one line per trained trajectory to
  trained.jsonl) unless its update number was already written (a resumed driver re-reading the
  stream behind its saved cursor);
- a learner's start event {"event": "start", "update": U} means the learner resumed at update U:
  its dead incarnation's rows of updates after U are redone, so lines with update > U are dropped
  from both files (rewritten through a temporary file + rename).
`metrics.cursor` holds the stream id of the last entry handled, so a resumed run tails from there.
With both rules every update appears once in metrics.jsonl and every trained trajectory once in
trained.jsonl.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

METRICS, TRAINED, CURSOR = "metrics.jsonl", "trained.jsonl", "metrics.cursor"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


class RunFiles:
    """The run dir's metrics.jsonl / trained.jsonl / metrics.cursor (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, fresh: bool):
        self.dir = Path(run_dir)
        if fresh:
            for name in (METRICS, TRAINED, CURSOR):
                (self.dir / name).unlink(missing_ok=True)
        self.rows = _read_jsonl(self.dir / METRICS)
        self.last_update = max((r["update"] for r in self.rows), default=0)
        self.truncations: list[dict[str, int]] = []  # {"resumed_at": U, "dropped_updates": n}
        self._mfh = open(self.dir / METRICS, "a")
        self._tfh = open(self.dir / TRAINED, "a")

    def cursor(self) -> Optional[str]:
        path = self.dir / CURSOR
        return path.read_text().strip() or None if path.is_file() else None

    def save_cursor(self, entry_id: str) -> None:
        tmp = self.dir / f".{CURSOR}.tmp"
        tmp.write_text(entry_id + "\n")
        os.replace(tmp, self.dir / CURSOR)

    def handle(self, m: dict[str, Any]) -> bool:
        """Apply one metrics-stream entry; True if it was an update row now written."""
        if m.get("event") == "start":
            self.truncate_after(int(m["update"]))
            return False
        if m.get("event") is not None or m["update"] <= self.last_update:
            return False
        ids, versions = m.get("traj_ids", []), m.get("sampled_versions", [])
        row = {k: v for k, v in m.items() if k not in ("traj_ids", "sampled_versions")}
        self._mfh.write(json.dumps(row) + "\n")
        for tid, v in zip(ids, versions):
            self._tfh.write(json.dumps({"traj_id": tid, "sampled_version": v,
                                        "trained_at_version": m["trained_at_version"], "update": m["update"]}) + "\n")
        self._mfh.flush()
        self._tfh.flush()
        self.rows.append(row)
        self.last_update = m["update"]
        return True

    def truncate_after(self, update: int) -> int:
        """Drop lines of updates after `update` from both files; how many updates were dropped."""
        if self.last_update <= update:
            return 0
        self._mfh.close()
        self._tfh.close()
        dropped = sum(1 for r in self.rows if r["update"] > update)
        self.rows = [r for r in self.rows if r["update"] <= update]
        _rewrite(self.dir / METRICS, self.rows)
        _rewrite(self.dir / TRAINED, [t for t in _read_jsonl(self.dir / TRAINED) if t["update"] <= update])
        self.last_update = max((r["update"] for r in self.rows), default=0)
        self.truncations.append({"resumed_at": update, "dropped_updates": dropped})
        self._mfh = open(self.dir / METRICS, "a")
        self._tfh = open(self.dir / TRAINED, "a")
        return dropped

    def trained_ids(self) -> list[str]:
        return [t["traj_id"] for t in _read_jsonl(self.dir / TRAINED)]

    def close(self) -> None:
        self._mfh.close()
        self._tfh.close()
