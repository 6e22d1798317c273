"""One Redis connection from a URL, with bounded retries and a URL that is safe to log.

URLs: redis://, rediss:// (TLS; extra ssl_* options pass through to redis-py) and unix://, with
an ACL user and password in the userinfo (`redis://user:pass@host:6379/0`) or `?password=`.
The password never reaches a log line or an exception: everything prints `redacted_url(url)`.

Retries: a command that fails with a connection error or timeout is retried `retries` times
with exponential backoff (backoff_s, 2·backoff_s, ... capped at backoff_max_s), then raises
`TransportError` naming the redacted URL. redis-py's own retry is switched off on the clients
made here so the bound is ours alone. Authentication errors are not retried. At-least-once
delivery makes retrying writes safe: a duplicated XADD is dropped by the learner's
deduplication by traj_id.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import TransportError

log = logging.getLogger(__name__)
T = TypeVar("T")
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "ssl_password", "ssl_keyfile_password"})


def redacted_url(url: str) -> str:
    """The URL with its password (userinfo or query) replaced by ***; safe to log."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
            # a lone userinfo is a username to redis-py, but often a misplaced password: hide it
            netloc = f"{user}:***@{host}" if user else f"***@{host}"
        query = urlencode([(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*/")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable redis url>"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for connection errors."""

    retries: int = 5
    backoff_s: float = 0.05
    backoff_max_s: float = 2.0

    def delays(self) -> Iterator[float]:
        for i in range(self.retries):
            yield min(self.backoff_max_s, self.backoff_s * 2 ** i)


def _describe(client: redis.Redis) -> str:
    """A password-free name of an existing client's server, for messages."""
    kw = client.connection_pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisConnection:
    """A redis-py client (binary-safe: decode_responses off) plus the retry policy for it."""

    def __init__(self, client: redis.Redis, *, retry: RetryPolicy = RetryPolicy(),
                 name: str | None = None, owns_client: bool = False):
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("the Redis client must have decode_responses=False: "
                             "payloads are bytes")
        self.client = client
        self.retry = retry
        self.name = name or _describe(client)
        self._secret = kwargs.get("password")
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str, *, retry: RetryPolicy = RetryPolicy(),
                 connect_timeout_s: float = 5.0, socket_timeout_s: float | None = 30.0,
                 check: bool = True, **redis_kwargs: Any) -> "RedisConnection":
        """Connect to `url`; with `check`, PING now so a wrong URL fails here, not mid-run."""
        name = redacted_url(url)
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                          socket_timeout=socket_timeout_s, decode_responses=False,
                                          retry=Retry(NoBackoff(), 0), **redis_kwargs)
        except ValueError as exc:  # redis-py's message does not contain the URL
            raise ValueError(f"invalid Redis URL {name}: {exc}") from None
        conn = cls(client, retry=retry, name=name, owns_client=True)
        if check:
            try:
                conn.ping()
            except BaseException:
                conn.close()
                raise
        return conn

    @classmethod
    def from_config(cls, cfg: Any, url: str | None = None, **kw: Any) -> "RedisConnection":
        """From a `RedisConfig` (url, retries, backoff_s, backoff_max_s, timeouts); `url`
        overrides cfg.url (the driver passes the embedded server's URL when cfg.url is None)."""
        target = url or cfg.url
        if target is None:
            raise ValueError("no Redis URL: start an embedded server and pass its url")
        retry = RetryPolicy(cfg.retries, cfg.backoff_s, cfg.backoff_max_s)
        return cls.from_url(target, retry=retry,
                            connect_timeout_s=cfg.connect_timeout_s,
                            socket_timeout_s=cfg.socket_timeout_s, **kw)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs), retried on connection errors with backoff, else TransportError."""
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except redis.AuthenticationError as exc:
                raise TransportError(f"Redis at {self.name} refused the credentials: "
                                     f"{self._scrub(str(exc))}") from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                delay = next(delays, None)
                if delay is None:
                    raise TransportError(f"Redis at {self.name} unreachable after {attempt} "
                                         f"attempt(s): {self._scrub(str(exc))}") from None
                log.warning("Redis at %s: %s; retry %d/%d in %.2fs", self.name,
                            self._scrub(str(exc)), attempt, self.retry.retries, delay)
                time.sleep(delay)

    def execute(self, *args: Any, **options: Any) -> Any:
        return self.call(self.client.execute_command, *args, **options)

    def ping(self) -> bool:
        return bool(self.call(self.client.ping))

    def close(self) -> None:
        """Close the client if this object created it (an injected client is the caller's)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> "RedisConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisConnection({self.name})"
