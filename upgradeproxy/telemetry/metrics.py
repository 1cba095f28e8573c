"""What the proxy reports: the Prometheus metrics behind /metrics, and the access-log lines
of the records (telemetry/access.py) it is handed.

The exchange code calls these hooks; it never formats logs or metrics itself. Storage is
`prometheus-client`: a private registry per `Telemetry` in a single process (so several proxies
in one test process never collide), and its multiprocess mode when the supervisor has set
$PROMETHEUS_MULTIPROC_DIR (`workers > 1`), so a scrape of any worker reports the totals of all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from upgradeproxy.telemetry.access import ExchangeRecord, access_log
from upgradeproxy.telemetry.processes import Steady, WorkerProcesses

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DIRECTIONS: Final = ("up", "down")  # up = client -> upstream, down = upstream -> client
CONNECT_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
HEADER_BUCKETS: Final = (*DURATION_BUCKETS, 30.0, 60.0)

# Multiprocess mode has no `*_created` series; drop them here too so both modes expose the
# same families (and each new label set costs no extra clock read).
disable_created_metrics()  # type: ignore[no-untyped-call]


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

    def declare(self, *values: str) -> None:
        """Show the series at 0 before its first count."""
        if values not in self.children:
            self.children[values] = self.metric.labels(*values)


class Telemetry:
    """The proxy's metrics and access log, fed by the exchange and tunnel code."""

    def __init__(self) -> None:
        # Read once: prometheus-client chose its storage from the same variable at import.
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry()
        reg = self.registry
        # One bound method for every tunnel to keep, instead of one each (64 bytes a tunnel).
        self.count_tunnel_bytes = self.tunnel_moved
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
            "Upgraded tunnels open now, by route and protocol.",
            ("route", "protocol"),
            registry=reg,
            multiprocess_mode="livesum",
        )
        # Bounded like _Labelled's: routes from the config, protocols each route allows.
        self._tunnel_gauges: dict[tuple[str, str], Gauge] = {}
        self._duration = Histogram(
            "upgradeproxy_request_duration_seconds",
            "Time from a request head to the end of its response (to the 101 for upgrades).",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        # Refusals at the edge, by route ("" for a 429 whose request did not route).
        self._refusals = {
            kind: _Labelled(Counter(name, doc, ("route",), registry=reg))
            for kind, name, doc in (
                ("origin", "upgradeproxy_origin_refusals_total",
                 "Upgrades refused with 403: their Origin is not in the route's allowed_origins."),
                ("limited", "upgradeproxy_limit_refusals_total",
                 "Connections refused with 429 by limits.max_connections_per_ip."),
            )
        }  # fmt: skip
        self._connections_active = Gauge(
            "upgradeproxy_connections_active",
            "Client connections open now (TLS handshakes and tunnels included).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._connections_limited = Counter(
            "upgradeproxy_connections_limited_total",
            "Times limits.max_connections was reached and a waiting client had to stay queued.",
            registry=reg,
        )
        self._connect_seconds = _LabelledHistogram(Histogram(
            "upgradeproxy_upstream_connect_seconds",
            "TCP (+TLS) connect time to an upstream server, new connections only.",
            ("upstream",), buckets=CONNECT_BUCKETS, registry=reg,
        ))  # fmt: skip
        self._header_seconds = _LabelledHistogram(Histogram(
            "upgradeproxy_upstream_header_seconds",
            "From the start of an upstream connect (or pool pick) to the response head.",
            ("upstream",), buckets=HEADER_BUCKETS, registry=reg,
        ))  # fmt: skip
        if self.multiprocess_dir is None:
            # process_*: memory, CPU, descriptors of this process
            reg.register(Steady(ProcessCollector(registry=None)))
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
        self._ws_messages = Counter(
            "upgradeproxy_websocket_messages_total",
            "WebSocket data messages relayed on routes with a websocket block, by route and "
            "direction (up: client to upstream).",
            ("route", "direction"),
            registry=reg,
        )
        self._ws_closes = _Labelled(
            Counter(
                "upgradeproxy_websocket_closes_total",
                "Tunnels the proxy closed for a websocket rule, by route and the close code "
                "sent to the side that broke it.",
                ("route", "code"),
                registry=reg,
            )
        )
        self._tunnels_parked = Gauge(
            "upgradeproxy_tunnels_parked",
            "Open tunnels parked now: idle, watched by the waiter (counted in tunnels_active too).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        # livemax: every worker looks up on its own; mid-change, the largest set any has.
        self._upstream_servers = Gauge(
            "upgradeproxy_upstream_servers",
            "Servers an upstream has now: configured, or found in DNS.",
            ("upstream",), registry=reg, multiprocess_mode="livemax",
        )  # fmt: skip
        self._lookups = _Labelled(Counter(
            "upgradeproxy_discovery_lookups_total",
            "DNS lookups of discovered upstreams, by result (ok, empty, error).",
            ("upstream", "result"), registry=reg,
        ))  # fmt: skip

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

    def tunnels_parked(self, count: int) -> None:
        """How many of this process's open tunnels are parked now."""
        self._tunnels_parked.set(count)

    def tunnel_opened(self, rec: ExchangeRecord | None = None) -> None:
        """Count an open tunnel under its record's route and protocol (the same at close)."""
        self._tunnel_gauge(rec).inc()

    def declare_routes(self, routes: list[tuple[str, tuple[str, ...]]]) -> None:
        """Show `tunnels_active 0` for every (route, allowed protocol) before any tunnel opens,
        so a scrape sees the series from the start, as it did before the labels came."""
        for route, protocols in routes:
            for protocol in protocols:
                name = _protocol_label(protocol)
                if (route, name) not in self._tunnel_gauges:
                    self._tunnel_gauges[route, name] = self._tunnels_active.labels(route, name)

    def tunnel_moved(self, direction: str, n: int) -> None:
        self._tunnel_bytes[direction].inc(n)

    def tunnel_closed(self, rec: ExchangeRecord) -> None:
        """Count a closed tunnel and write its access-log line."""
        self._tunnel_gauge(rec).dec()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("tunnel", extra={"record": rec.as_log()})

    def websocket_counters(self, route: str) -> tuple[Counter, Counter]:
        """The (up, down) message counters of `route`, for a tunnel to keep and add to."""
        return self._ws_messages.labels(route, "up"), self._ws_messages.labels(route, "down")

    def websocket_closed(self, route: str, code: int) -> None:
        """Count a tunnel closed by a websocket rule, by the code the offender was sent."""
        self._ws_closes.inc(route, str(code))

    # --- reading -------------------------------------------------------------------------

    @property
    def tunnels_active(self) -> int:
        """Tunnels open in this process, every route and protocol."""
        return int(sum(s.value for m in self._tunnels_active.collect() for s in m.samples))

    @property
    def tunnel_bytes(self) -> dict[str, int]:
        """Bytes relayed by this process's tunnels, by direction."""
        name = "upgradeproxy_tunnel_bytes_total"
        return {d: int(self._sample(name, {"direction": d})) for d in DIRECTIONS}

    def _sample(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    @functools.cached_property
    def _workers(self) -> WorkerProcesses:
        assert self.multiprocess_dir is not None
        return WorkerProcesses(self.multiprocess_dir)

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4: this process, or all workers' totals."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry).decode()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        merged.register(self._workers)
        return generate_latest(merged).decode()

    def refused(self, kind: str, route: str) -> None:
        """Count a 403 origin or 429 limit refusal (other kinds are not refusals)."""
        if (counter := self._refusals.get(kind)) is not None:
            counter.inc(route)

    def _tunnel_gauge(self, rec: ExchangeRecord | None) -> Gauge:
        """The tunnels_active child for a tunnel's route and protocol name (no version)."""
        route = rec.route if rec is not None else ""
        protocol = _protocol_label(rec.protocol.split(",")[0]) if rec else ""
        child = self._tunnel_gauges.get((route, protocol))
        if child is None:
            child = self._tunnel_gauges[route, protocol] = self._tunnels_active.labels(
                route, protocol
            )
        return child

    # --- connection and upstream-timing hooks (issue 11) ----------------------------------

    def connection_opened(self) -> None:
        self._connections_active.inc()

    def connection_closed(self) -> None:
        self._connections_active.dec()

    def connection_limited(self) -> None:
        self._connections_limited.inc()

    def upstream_connected(self, upstream: str, seconds: float) -> None:
        self._connect_seconds.observe(upstream, seconds)

    def upstream_header(self, upstream: str, seconds: float) -> None:
        self._header_seconds.observe(upstream, seconds)

    # --- per-server gauges (interface.md admin additions) ---------------------------------

    def upstream_healthy(self, upstream: str, server: str, healthy: bool) -> None:
        self._server_gauge(self._upstream_healthy, "h", upstream, server).set(int(healthy))

    def upstream_tunnels(self, upstream: str, server: str, open_now: int) -> None:
        self._server_gauge(self._upstream_tunnels, "t", upstream, server).set(open_now)

    def upstream_servers(self, upstream: str, count: int) -> None:
        self._upstream_servers.labels(upstream).set(count)

    def discovery_lookup(self, upstream: str, result: str | None = None) -> None:
        """Count one lookup; with no `result`, show the upstream's three series at 0."""
        if result is None:
            for name in ("ok", "empty", "error"):
                self._lookups.declare(upstream, name)
        else:
            self._lookups.inc(upstream, result)

    def server_gone(self, upstream: str, server: str) -> None:
        """A discovered server left and holds no tunnel: drop its per-server series (in this
        process; with workers, a dead series stays in the shared files until the restart)."""
        if self.multiprocess_dir is not None:
            return  # prometheus-client cannot remove a series from the shared files
        for tag, family in (("h", self._upstream_healthy), ("t", self._upstream_tunnels)):
            if self._server_gauges.pop((tag, upstream, server), None) is not None:
                with contextlib.suppress(KeyError):
                    family.remove(upstream, server)

    def _server_gauge(self, family: Gauge, tag: str, upstream: str, server: str) -> Gauge:
        """A labelled child looked up once (`labels()` takes a lock)."""
        child = self._server_gauges.get((tag, upstream, server))
        if child is None:
            child = self._server_gauges[tag, upstream, server] = family.labels(upstream, server)
        return child


def _protocol_label(token: str) -> str:
    """The `protocol` label of a tunnel: the name without its version, `SPDY/3.1` -> `spdy`."""
    return token.split("/")[0].strip().lower()


class _LabelledHistogram:
    """A histogram by upstream whose children are looked up once (see `_Labelled`)."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Histogram) -> None:
        self.metric = metric
        self.children: dict[str, Histogram] = {}

    def observe(self, label: str, value: float) -> None:
        child = self.children.get(label)
        if child is None:
            child = self.children[label] = self.metric.labels(label)
        child.observe(value)
