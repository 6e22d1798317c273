"""The HTTP endpoint of one process: bind `bind_address`, take the first free port of
`port_range`, serve the registry from a daemon thread; the URL other machines scrape."""
from __future__ import annotations

import socket
from typing import Any

from prometheus_client import start_http_server


class MetricsServerError(RuntimeError):
    pass


def node_address() -> str:
    """This machine's address as the cluster sees it: the Ray node IP inside Ray, else the IP the
    host name resolves to (falling back to the host name)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - Ray missing or not connected: use the host
        pass
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def advertised_host(bind_address: str) -> str:
    """Where a scraper reaches a server bound to `bind_address` (a wildcard means this node's IP)."""
    return node_address() if bind_address in ("", "0.0.0.0", "::") else bind_address


def serve(registry, bind_address: str, port_range: tuple[int, int]) -> tuple[str, Any]:
    """Start the server on the first port of `port_range` (inclusive) that binds; returns
    (http://host:port/metrics, server). Raises MetricsServerError naming the range if none is free."""
    lo, hi = int(port_range[0]), int(port_range[1])
    last = None
    for port in range(lo, hi + 1):
        try:
            httpd, _thread = start_http_server(port, addr=bind_address, registry=registry)
        except OSError as exc:
            last = exc
            continue
        return f"http://{_url_host(advertised_host(bind_address))}:{port}/metrics", httpd
    raise MetricsServerError(f"distributed.metrics.port_range: no free port in {lo}-{hi} on "
                             f"{bind_address!r} ({last})")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
