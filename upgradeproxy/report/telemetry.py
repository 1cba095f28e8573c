"""What the proxy reports: access-log records and the Prometheus metrics behind /metrics.

The exchange code calls these hooks; it never formats logs or metrics itself. Storage is
`prometheus-client`: a private registry per `Telemetry` in a single process (so several proxies
in one test process never collide), and its multiprocess mode when the supervisor has set
$PROMETHEUS_MULTIPROC_DIR (`workers > 1`), so a scrape of any worker reports the totals of all.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

access_log = logging.getLogger("upgradeproxy.access")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DIRECTIONS: Final = ("up", "down")  # up = client -> upstream, down = upstream -> client

# Multiprocess mode has no `*_created` series; drop them here too so both modes expose the
# same families (and each new label set costs no extra clock read).
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass(slots=True)
class ExchangeRecord:
    """One access-log line: an HTTP exchange or a closed tunnel."""

    client: str
    method: str = ""
    host: str = ""
    path: str = ""
    route: str = ""
    upstream: str = ""
    server: str = ""
    status: int = 0
    bytes_in: int = 0  # from the client
    bytes_out: int = 0  # to the client
    duration: float = 0.0
    protocol: str = ""
    first_close: str = ""
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    kind: str = "http"  # or "tunnel"
    logged: bool = False  # the line is written (a 101's HTTP line, before its tunnel runs)

    def as_log(self) -> dict[str, object]:
        """The log fields: every field the contract lists, even when empty (so a line always
        has the same keys); `protocol`, `first_close` and `error` only where they apply."""
        out: dict[str, object] = {}
        for name in _LOG_FIELDS:
            value = getattr(self, name)
            if value != "" or name not in _OPTIONAL_FIELDS:
                out[name] = value
        out["duration"] = round(self.duration, 6)
        return out


_OPTIONAL_FIELDS: Final = frozenset({"protocol", "first_close", "error"})

# `started` is a monotonic clock reading, meaningless outside the process; the formatter
# stamps each line with wall-clock time instead.
_LOG_FIELDS: Final = tuple(
    f.name for f in fields(ExchangeRecord) if f.name not in ("started", "logged")
)


class _Labelled:
    """A labelled counter whose children are looked up once: `labels()` takes a lock."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Counter) -> None:
        self.metric = metric
        # Bounded: label values come from the config (routes, upstreams) and small fixed sets.
        self.children: dict[tuple[str, ...], Counter] = {}

    def inc(self, *values: str) -> None:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        child.inc()


class Telemetry:
    """The proxy's metrics and access log, fed by the exchange and tunnel code."""

    def __init__(self) -> None:
        # Read once: prometheus-client chose its storage from the same variable at import.
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry()
        reg = self.registry
        self._requests = _Labelled(
            Counter(
                "upgradeproxy_requests_total",
                "HTTP exchanges by route and response status code.",
                ("route", "code"),
                registry=reg,
            )
        )
        self._upgrades = _Labelled(
            Counter(
                "upgradeproxy_upgrades_total",
                "Upgrade offers by route, protocol and result (switched, declined, rejected).",
                ("route", "protocol", "result"),
                registry=reg,
            )
        )
        self._upstream_errors = _Labelled(
            Counter(
                "upgradeproxy_upstream_errors_total",
                "Upstream failures by upstream and kind.",
                ("upstream", "kind"),
                registry=reg,
            )
        )
        bytes_total = Counter(
            "upgradeproxy_tunnel_bytes_total",
            "Bytes relayed by tunnels, by direction (up: client to upstream).",
            ("direction",),
            registry=reg,
        )
        self._tunnel_bytes = {d: bytes_total.labels(d) for d in DIRECTIONS}
        # livesum: the open tunnels of live workers; a dead worker's are dropped with its file.
        self._tunnels_active = Gauge(
            "upgradeproxy_tunnels_active",
            "Upgraded tunnels open now.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._duration = Histogram(
            "upgradeproxy_request_duration_seconds",
            "Time from a request head to the end of its response (to the 101 for upgrades).",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        # livemin: a server is reported healthy only if every live worker's checks say so.
        self._upstream_healthy = Gauge(
            "upgradeproxy_upstream_healthy",
            "1 while a server passes its health checks (or has none), else 0.",
            ("upstream", "server"),
            registry=reg,
            multiprocess_mode="livemin",
        )
        self._upstream_tunnels = Gauge(
            "upgradeproxy_upstream_tunnels",
            "Tunnels open now, by upstream and server.",
            ("upstream", "server"),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._server_gauges: dict[tuple[str, str, str], Gauge] = {}

    # --- hooks called by the exchange code ----------------------------------------------

    def exchange_done(self, rec: ExchangeRecord) -> None:
        """Count a finished HTTP exchange and write its access-log line."""
        self._requests.inc(rec.route, str(rec.status))
        self._duration.observe(rec.duration)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("http", extra={"record": rec.as_log()})

    def upgrade(self, route: str, protocol: str, result: str) -> None:
        self._upgrades.inc(route, protocol, result)

    def upstream_error(self, upstream: str, kind: str) -> None:
        self._upstream_errors.inc(upstream, kind)

    def tunnel_opened(self) -> None:
        self._tunnels_active.inc()

    def tunnel_moved(self, direction: str, n: int) -> None:
        self._tunnel_bytes[direction].inc(n)

    def tunnel_closed(self, rec: ExchangeRecord) -> None:
        """Count a closed tunnel and write its access-log line."""
        self._tunnels_active.dec()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("tunnel", extra={"record": rec.as_log()})

    # --- reading -------------------------------------------------------------------------

    @property
    def tunnels_active(self) -> int:
        """Tunnels open in this process."""
        return int(self._sample("upgradeproxy_tunnels_active", {}))

    @property
    def tunnel_bytes(self) -> dict[str, int]:
        """Bytes relayed by this process's tunnels, by direction."""
        name = "upgradeproxy_tunnel_bytes_total"
        return {d: int(self._sample(name, {"direction": d})) for d in DIRECTIONS}

    def _sample(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4: this process, or all workers' totals."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry).decode()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged).decode()

    # --- per-server gauges (interface.md admin additions) ---------------------------------

    def upstream_healthy(self, upstream: str, server: str, healthy: bool) -> None:
        self._server_gauge(self._upstream_healthy, "h", upstream, server).set(int(healthy))

    def upstream_tunnels(self, upstream: str, server: str, open_now: int) -> None:
        self._server_gauge(self._upstream_tunnels, "t", upstream, server).set(open_now)

    def _server_gauge(self, family: Gauge, tag: str, upstream: str, server: str) -> Gauge:
        """A labelled child looked up once (`labels()` takes a lock)."""
        child = self._server_gauges.get((tag, upstream, server))
        if child is None:
            child = self._server_gauges[tag, upstream, server] = family.labels(upstream, server)
        return child
