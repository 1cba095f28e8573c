"""telemetry/logs.py: the access-log records and their JSON and text formatters (contract
"Access log")."""

from __future__ import annotations

import json
import logging
import re

from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.telemetry.logs import JsonFormatter, TextFormatter, _Static
from upgradeproxy.telemetry.metrics import Telemetry


def exchange(route: str = "*/", status: int = 200, duration: float = 0.02) -> ExchangeRecord:
    return ExchangeRecord(
        client="192.0.2.7", method="GET", host="a.test", path="/x", route=route,
        upstream="app", server="127.0.0.1:9000", status=status, duration=duration,
    )  # fmt: skip


def test_exchange_and_tunnel_lines_carry_the_contract_fields(caplog):
    """One line per exchange and per closed tunnel: client, method, host, path, route,
    upstream server, status, bytes each way, duration; tunnels add protocol and who closed."""
    t = Telemetry()
    with caplog.at_level(logging.INFO, logger="upgradeproxy.access"):
        t.exchange_done(exchange())
        tunnel = exchange(status=101)
        tunnel.kind, tunnel.protocol, tunnel.first_close = "tunnel", "websocket", "client"
        t.tunnel_opened(tunnel)
        tunnel.bytes_in, tunnel.bytes_out, tunnel.duration = 11, 7, 1.25
        t.tunnel_closed(tunnel)
    http, closed = (r.record for r in caplog.records)  # type: ignore[attr-defined]
    common = {"client", "method", "host", "path", "route", "upstream", "server", "status"}
    assert common | {"bytes_in", "bytes_out", "duration", "kind"} <= set(http)
    assert "protocol" not in http
    assert "started" not in http
    assert (closed["protocol"], closed["first_close"]) == ("websocket", "client")
    assert (closed["bytes_in"], closed["bytes_out"], closed["duration"]) == (11, 7, 1.25)


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord("upgradeproxy.access", logging.INFO, "", 0, "tunnel", (), None)
    record.record = fields
    return record


def test_json_lines_have_fields_at_top_level_and_an_iso_time():
    record = _record(client="192.0.2.7", path="/chat", first_close="upstream")
    _Static({"worker": 1}).filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["logger"]) == ("tunnel", "upgradeproxy.access")
    assert (line["client"], line["path"], line["first_close"]) == ("192.0.2.7", "/chat", "upstream")
    assert line["worker"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


def test_text_lines_quote_values_with_spaces():
    text = TextFormatter().format(_record(path="/a", error="upstream reset: gone", empty=""))
    assert ' path=/a error="upstream reset: gone" empty=""' in text
