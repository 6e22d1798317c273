"""Prometheus metrics of the distributed service (ARCHITECTURE.md, Observability): the metric
definitions (`definitions.METRICS`, the one place with names, help and labels), a per-process
registry with hook methods for each role (`RoleMetrics`), the HTTP endpoint (`serve`) and the
file-service-discovery target list the driver keeps current (`discovery`)."""
from .definitions import METRICS, PREFIX, exported_names, full_name
from .discovery import TARGETS_FILE, TargetsWriter, register_endpoint, write_targets
from .roles import RoleMetrics, index_from_name
from .server import MetricsServerError, serve


def start_role_metrics(mcfg, role: str, index: int, conn=None, keys=None) -> RoleMetrics:
    """A role's metrics, served on `mcfg.bind_address` / `mcfg.port_range` when `mcfg.enabled`,
    and registered in the run's Redis (for the driver's target file) when `conn`/`keys` are given."""
    rm = RoleMetrics(role, index, enabled=mcfg.enabled)
    if mcfg.enabled:
        rm.serve(mcfg.bind_address, tuple(mcfg.port_range))
        if conn is not None and keys is not None:
            register_endpoint(conn, keys, rm.endpoint())
    return rm


__all__ = ["METRICS", "PREFIX", "TARGETS_FILE", "MetricsServerError", "RoleMetrics", "TargetsWriter",
           "exported_names", "full_name", "index_from_name", "register_endpoint", "serve", "start_role_metrics", "write_targets"]
