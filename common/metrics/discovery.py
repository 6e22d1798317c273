"""Prometheus file-based service discovery for a run.

Each process registers its endpoint in the run's Redis hash `metrics:endpoints` (field
`<role>-<index>`, a JSON object with url, role, index, node); a restarted actor overwrites its
own field with its new port. The driver reads the hash while the run goes on and rewrites
`<run_dir>/prometheus_targets.json` whenever it changed:

    [{"targets": ["host:port"], "labels": {"role": "sampler", "index": "0", "node": "..."}}, ...]

(the format of Prometheus `file_sd_configs`; written to a temporary file and renamed, so a
reader never sees half a file)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TARGETS_FILE = "prometheus_targets.json"
ENDPOINTS_KEY = "metrics:endpoints"


def endpoints_key(keys) -> str:
    """The hash's name under the run's namespace (`keys`: a RunKeys)."""
    return keys.key(ENDPOINTS_KEY)


def register_endpoint(conn, keys, endpoint: dict[str, Any]) -> None:
    """HSET this process's endpoint (`conn`: a RedisConnection)."""
    if not endpoint.get("url"):
        return
    conn.call(conn.client.hset, endpoints_key(keys), f"{endpoint['role']}-{endpoint['index']}",
              json.dumps(endpoint, sort_keys=True))


def read_endpoints(conn, keys) -> list[dict[str, Any]]:
    raw = conn.call(conn.client.hgetall, endpoints_key(keys)) or {}
    out = []
    for _, value in sorted(raw.items()):
        value = value.decode() if isinstance(value, bytes) else value
        try:
            ep = json.loads(value)
        except ValueError:
            continue  # not ours; never fatal for the run
        if isinstance(ep, dict) and isinstance(ep.get("url"), str):
            out.append(ep)
    return out


def file_sd_targets(endpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The file_sd JSON document for `endpoints` (sorted by role, index)."""
    groups = []
    for ep in sorted(endpoints, key=lambda e: (str(e["role"]), int(e["index"]))):
        parts = urlsplit(ep["url"])
        groups.append({"targets": [parts.netloc],
                       "labels": {"role": str(ep["role"]), "index": str(ep["index"]), "node": str(ep.get("node", "")),
                                  "__metrics_path__": parts.path or "/metrics"}})
    return groups


def write_targets(run_dir: str | Path, endpoints: list[dict[str, Any]]) -> Path:
    path = Path(run_dir) / TARGETS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(file_sd_targets(endpoints), indent=2) + "\n")
    os.replace(tmp, path)
    return path


class TargetsWriter:
    """Keeps `<run_dir>/prometheus_targets.json` equal to the registered endpoints (`refresh`
    rewrites only on a change)."""

    def __init__(self, conn, keys, run_dir: str | Path):
        self.conn, self.keys, self.run_dir = conn, keys, Path(run_dir)
        self.last: list | None = None

    def reset(self) -> None:
        """Forget endpoints of an earlier run in this Redis (before the actors start)."""
        self.conn.call(self.conn.client.delete, endpoints_key(self.keys))
        self.last = None

    def refresh(self) -> bool:
        eps = read_endpoints(self.conn, self.keys)
        if eps == self.last:
            return False
        write_targets(self.run_dir, eps)
        self.last = eps
        return True

    def clear(self) -> None:
        """At the end of the run: no endpoint is live any more."""
        write_targets(self.run_dir, [])
        self.last = []
