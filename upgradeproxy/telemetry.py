"""What the proxy reports: access-log records and the metrics behind /metrics.

The exchange code calls these hooks; it never formats logs or metrics itself. Counting is
plain dict arithmetic (cheap on the hot path); rendering happens only when scraped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Final

access_log = logging.getLogger("upgradeproxy.access")

DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
    kind: str = "http"

    def as_log(self) -> dict[str, object]:
        out = asdict(self)
        del out["started"]
        out["duration"] = round(self.duration, 6)
        out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return {k: v for k, v in out.items() if v != "" or k in ("route", "upstream")}


LabelKey = tuple[str, ...]


@dataclass(slots=True)
class Telemetry:
    """Counters for one process, fed by the exchange and tunnel code."""

    requests: dict[LabelKey, int] = field(default_factory=dict)
    upgrades: dict[LabelKey, int] = field(default_factory=dict)
    upstream_errors: dict[LabelKey, int] = field(default_factory=dict)
    tunnel_bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    tunnels_active: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0

    def exchange_done(self, rec: ExchangeRecord) -> None:
        key = (rec.route, str(rec.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self._observe(rec.duration)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("http", extra={"record": rec.as_log()})

    def upgrade(self, route: str, protocol: str, result: str) -> None:
        key = (route, protocol, result)
        self.upgrades[key] = self.upgrades.get(key, 0) + 1

    def upstream_error(self, upstream: str, kind: str) -> None:
        key = (upstream, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def tunnel_opened(self) -> None:
        self.tunnels_active += 1

    def tunnel_moved(self, direction: str, n: int) -> None:
        self.tunnel_bytes[direction] += n

    def tunnel_closed(self, rec: ExchangeRecord) -> None:
        self.tunnels_active -= 1
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("tunnel", extra={"record": rec.as_log()})

    def _observe(self, seconds: float) -> None:
        self.duration_sum += seconds
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        _family(
            lines,
            "upgradeproxy_requests_total",
            "counter",
            "HTTP exchanges by route and status.",
            [(("route", "code"), k, v) for k, v in self.requests.items()],
        )
        _family(
            lines,
            "upgradeproxy_upgrades_total",
            "counter",
            "Upgrade attempts by outcome.",
            [(("route", "protocol", "result"), k, v) for k, v in self.upgrades.items()],
        )
        _family(
            lines,
            "upgradeproxy_tunnels_active",
            "gauge",
            "Open upgraded tunnels.",
            [((), (), self.tunnels_active)],
        )
        _family(
            lines,
            "upgradeproxy_tunnel_bytes_total",
            "counter",
            "Bytes relayed by tunnels.",
            [(("direction",), (d,), v) for d, v in self.tunnel_bytes.items()],
        )
        _family(
            lines,
            "upgradeproxy_upstream_errors_total",
            "counter",
            "Upstream failures.",
            [(("upstream", "kind"), k, v) for k, v in self.upstream_errors.items()],
        )
        self._render_histogram(lines)
        return "\n".join(lines) + "\n"

    def _render_histogram(self, lines: list[str]) -> None:
        name = "upgradeproxy_request_duration_seconds"
        lines.append(f"# HELP {name} Time from request head to end of response.")
        lines.append(f"# TYPE {name} histogram")
        running = 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.buckets, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        lines.append(f"{name}_sum {self.duration_sum!r}")
        lines.append(f"{name}_count {running}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(
    lines: list[str],
    name: str,
    kind: str,
    help_text: str,
    samples: list[tuple[tuple[str, ...], tuple[str, ...], int]],
) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for names, values, value in samples:
        labels = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
        lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
