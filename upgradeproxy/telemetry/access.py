"""The access log: one `ExchangeRecord` per HTTP exchange and per closed tunnel, filled in by
the exchange and tunnel code, and the fields its line shows (contract "Access log").

`Telemetry` (telemetry/metrics.py) writes the line to `access_log` as it counts the record;
the formatters in telemetry/logs.py lay the fields out as JSON or text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from typing import Final

__all__ = ["ExchangeRecord", "access_log"]

access_log = logging.getLogger("upgradeproxy.access")


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
    query: str | None = None  # only with `access_log: {query: true}`
    upstream_connect: float | None = None  # seconds; 0 on a pooled connection
    upstream_header: float | None = None  # seconds from that connect to the response head
    request_id: str = ""
    user_agent: str = ""
    client_cert: str = ""  # the verified TLS client certificate's subject
    # Data messages each way, on routes with a `websocket` block only (rule 18).
    messages_in: int | None = None  # from the client
    messages_out: int | None = None  # to the client
    http_version: str = "1.1"  # the client's: "1.0", "1.1" or "2" (tunnel lines too)

    def as_log(self) -> dict[str, object]:
        """The log fields: every field the contract lists, even when empty (so a line always
        has the same keys); `protocol`, `first_close`, `error` and `client_cert` only where
        they apply, `query` only when configured, upstream timings only when one was used."""
        out: dict[str, object] = {}
        for name in _LOG_FIELDS:
            value = getattr(self, name)
            if value is None or (value == "" and name in _OPTIONAL_FIELDS):
                continue
            out[name] = round(value, 6) if isinstance(value, float) else value
        return out


_OPTIONAL_FIELDS: Final = frozenset({"protocol", "first_close", "error", "client_cert"})

# `started` is a monotonic clock reading, meaningless outside the process; the formatter
# stamps each line with wall-clock time instead.
_LOG_FIELDS: Final = tuple(
    f.name for f in fields(ExchangeRecord) if f.name not in ("started", "logged")
)
