"""`process_*` metrics: of this process, or of every live worker, steady within a second."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_LIVE_FILE: Final = re.compile(r"gauge_livesum_([0-9]+)\.db")


class Steady(Collector):
    """A collector's families, read at most once per second: the process figures (CPU
    seconds, memory) then do not change between a HEAD and the GET that follows it, so both
    give one length; counters and gauges of our own are never cached."""

    def __init__(self, inner: Collector, ttl: float = 1.0) -> None:
        self.inner = inner
        self.ttl = ttl
        self._at = float("-inf")
        self._families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        if now - self._at >= self.ttl:
            self._families = list(self.inner.collect())
            self._at = now
        return self._families


class WorkerProcesses(Collector):
    """`process_*` of every live worker, labelled `pid`, read from /proc at scrape time.

    prometheus-client's multiprocess collector has no process metrics, and one worker cannot
    report another's from its own counters; /proc is readable for processes of our user.
    A worker is live while its `gauge_livesum_PID.db` file exists (the supervisor removes it).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # One steady reader per live worker (see `_Steady`); a worker's goes when it does.
        self._readers: dict[int, Steady] = {}

    def collect(self) -> Iterable[Metric]:
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        pids = sorted(int(m[1]) for name in names if (m := _LIVE_FILE.fullmatch(name)))
        readers = {
            pid: self._readers.get(pid)
            or Steady(ProcessCollector(pid=_constant(pid), registry=None))
            for pid in pids
        }
        self._readers = readers
        families: dict[str, Metric] = {}
        for pid in pids:
            for metric in readers[pid].collect():
                family = families.setdefault(
                    metric.name, Metric(metric.name, metric.documentation, metric.type)
                )
                for sample in metric.samples:
                    labels = {**sample.labels, "pid": str(pid)}
                    family.add_sample(sample.name, labels, sample.value)
        return list(families.values())


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid
