"""Contract section "Access log": every line carries every field; error exchanges are logged
and counted.
"""

from __future__ import annotations

import socket

from tests.support.clients import (
    LOOPBACK,
    free_port,
    http,
    read_response,
    recv_exactly,
    ws_upgrade,
)
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.metrics import scrape, value
from tests.support.peers import echo_after_switch, respond_ok_forever
from tests.support.waiting import WAIT, eventually

# --- Access log ------------------------------------------------------------------------------

FIELDS = {
    "time": str, "client": str, "method": str, "host": str, "path": str, "route": str,
    "upstream": str, "server": str, "status": int, "bytes_in": int, "bytes_out": int,
    "duration": (int, float),
}  # fmt: skip


def test_every_access_line_carries_every_contract_field(run_proxy, raw_upstream):
    """One line per HTTP exchange and one per closed tunnel: time, client address, method,
    host, path, route, upstream server, status, bytes each way, duration, and for tunnels the
    protocol. (Every line, error exchanges included, has every field, typed.)"""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch())
    port = free_port()
    proc = run_proxy(
        config_yaml(
            {"web": web.port, "chat": chat.port, "gone": free_port()},
            [route("chat", path_prefix="/ws"), route("gone", path_prefix="/gone"),
             route("web", path_prefix="/web")],
            listen=port,
        )
    )  # fmt: skip
    assert http(port, "/web/ok")[0] == 200
    assert http(port, "/missing")[0] == 404
    assert http(port, "/gone/x")[0] == 502
    smuggle = b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    assert http(port, "/web/smuggle", method="POST", extra=smuggle)[0] == 400
    with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
        buf = ws_upgrade(sock, "/ws/t")
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3, buf) == b"abc"
    tunnel = proc.wait_log("tunnel")[0]
    lines = {r["status"]: r for r in proc.wait_log("http", count=5)}
    assert set(lines) == {200, 404, 502, 400, 101}, lines
    assert tunnel["protocol"] == "websocket"
    assert (tunnel["bytes_in"], tunnel["bytes_out"]) == (3, 3)
    problems = []
    for record in [*lines.values(), tunnel]:
        for field, kind in FIELDS.items():
            if not isinstance(record.get(field), kind):
                what = f"{record['msg']} {record['status']}"
                problems.append(f"{what}: {field}={record.get(field)!r}")
    expected = {200: "/web/ok", 404: "/missing", 502: "/gone/x", 400: "/web/smuggle", 101: "/ws/t"}
    for status, path in expected.items():
        if lines[status].get("path") != path:
            problems.append(f"http {status}: path={lines[status].get('path')!r}, sent {path}")
    assert not problems, "\n".join(problems)


# (what, bytes sent on a fresh connection, the status it must get)
MALFORMED = [
    ("bad request line", b"GARBAGE\r\n\r\n", 400),
    ("HTTP/1.1 without Host", b"GET /web HTTP/1.1\r\n\r\n", 400),
    ("obs-fold", b"GET /web HTTP/1.1\r\nHost: svc.test\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    ("CL with TE", b"POST /web HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 5\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("space before colon", b"GET /web HTTP/1.1\r\nHost : svc.test\r\n\r\n", 400),
    ("head too large", b"GET /web HTTP/1.1\r\nHost: svc.test\r\nX-Big: " + b"b" * 4000
                       + b"\r\n\r\n", 431),
    ("head never finished", b"GET /web HTTP/1.1\r\nHost: svc.test\r\n", 408),
    ("CONNECT", b"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test:443\r\n\r\n", 405),
    ("no route", b"GET /nowhere HTTP/1.1\r\nHost: svc.test\r\n\r\n", 404),
]  # fmt: skip


def test_error_exchanges_are_logged_and_counted(run_proxy, raw_upstream):
    """One line per HTTP exchange. Errors, each a short response and a log line ...: no route
    404; malformed request 400 (then close); head too large 431; `request_header` passed 408
    (then close); CONNECT 405. (Each gets its access line, and counts in
    `upgradeproxy_requests_total{route,code}`.)"""
    web = raw_upstream(respond_ok_forever)
    port, admin = free_port(), free_port()
    proc = run_proxy(
        proxy_yaml(web.port, route={"path_prefix": "/web"}, listen=port, admin=admin,
                   timeouts={"request_header": "300ms"},
                   limits={"max_request_header_bytes": 2048})
    )  # fmt: skip
    before = scrape(admin)
    for what, data, status in MALFORMED:
        with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
            sock.sendall(data)
            assert read_response(sock)[0] == status, what
    expected: dict[int, int] = {}
    for _, _, status in MALFORMED:
        expected[status] = expected.get(status, 0) + 1

    def logged() -> dict[int, int]:
        counts: dict[int, int] = {}
        for record in proc.access():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts

    eventually(lambda: logged() == expected, timeout=3)
    after = scrape(admin)
    counted = {
        status: value(after, "upgradeproxy_requests_total", code=str(status))
        - value(before, "upgradeproxy_requests_total", code=str(status))
        for status in expected
    }
    assert (logged(), counted) == (expected, expected), "\n".join(map(str, proc.access()))
