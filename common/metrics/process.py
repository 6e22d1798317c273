"""Process memory for Prometheus, read at scrape time (no cost between scrapes): resident memory
(psutil) and, where torch.cuda is available and initialised, CUDA memory allocated / reserved per
device."""
from __future__ import annotations

import sys

import psutil
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .definitions import METRICS, ROLE_LABELS, full_name


class ProcessCollector(Collector):
    def __init__(self, role_values: tuple[str, str, str]):
        self.values = list(role_values)
        self.proc = psutil.Process()

    def collect(self):
        rss = GaugeMetricFamily(full_name("process_resident_memory_bytes"),
                                METRICS["process_resident_memory_bytes"].help, labels=ROLE_LABELS)
        rss.add_metric(self.values, float(self.proc.memory_info().rss))
        yield rss
        torch = sys.modules.get("torch")  # never import torch just to report it
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for name, fn in (("gpu_memory_allocated_bytes", torch.cuda.memory_allocated),
                         ("gpu_memory_reserved_bytes", torch.cuda.memory_reserved)):
            fam = GaugeMetricFamily(full_name(name), METRICS[name].help, labels=ROLE_LABELS + ("device",))
            for d in range(torch.cuda.device_count()):
                fam.add_metric(self.values + [str(d)], float(fn(d)))
            yield fam
