"""Contract section "Access log": one line per exchange and per closed tunnel, with every field
(error exchanges included, each also counted), in JSON; what is logged of the query, the
user agent, timings and rejected heads."""

from __future__ import annotations

import re
import socket

import pytest

from tests.support.access_log import access_records
from tests.support.clients import (
    LOOPBACK,
    Tunnel,
    free_port,
    http,
    raw_client,
    read_response,
    recv_exactly,
    ws_upgrade,
)
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.metrics import scrape, value
from tests.support.peers import RawConn, echo_after_switch, respond_ok_forever
from tests.support.waiting import WAIT, eventually
from tests.support.wire import ok_response, values

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


def test_access_log_json_lines_for_an_exchange_and_a_tunnel(run_proxy, raw_upstream):
    """One JSON line per exchange and one per closed tunnel, with every contract field;
    `workers: 1` runs one process with no supervisor."""

    def answer_body(conn: RawConn) -> None:
        head = conn.read_head()
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        conn.send(ok_response(b"got " + conn.read_exactly(length)))

    web, chat = raw_upstream(answer_body), raw_upstream(echo_after_switch(b"A"))
    port = free_port()
    proc = run_proxy(
        config_yaml(
            {"web": web.port, "chat": chat.port},
            [route("web", path_prefix="/http"), route("chat")],
            listen=[port],
        )
    )
    assert http(port, "/http/form", method="POST", body=b"hello")[2] == b"got hello"
    tunnel = Tunnel(port, tag=1)
    assert tunnel.echo(b"y" * 300) == b"y" * 300
    tunnel.sock.shutdown(socket.SHUT_WR)  # the client ends first
    assert tunnel.closed_by_peer()
    tunnel.close()

    exchange = proc.wait_log("http", method="POST")[0]
    measured = {"time": None, "duration": None, "upstream_connect": None,
                "upstream_header": None, "request_id": None, "user_agent": None}  # fmt: skip
    assert exchange | measured == {
        "time": None, "level": "info", "logger": "upgradeproxy.access", "msg": "http",
        "client": LOOPBACK, "method": "POST", "host": "svc.test", "path": "/http/form",
        "route": "*/http", "upstream": "web", "server": f"{LOOPBACK}:{web.port}",
        "status": 200, "bytes_in": 5, "bytes_out": 9, "kind": "http", "http_version": "1.1",
        **measured, "pid": proc.popen.pid,
    }  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{32}", exchange["request_id"])
    assert 0 <= exchange["upstream_connect"] <= exchange["upstream_header"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", exchange["time"])
    assert isinstance(exchange["duration"], float)
    closed = proc.wait_log("tunnel")[0]
    assert closed["protocol"] == "websocket"
    assert closed["first_close"] == "client"
    assert (closed["bytes_in"], closed["bytes_out"]) == (300, 301)
    assert (closed["path"], closed["status"]) == ("/chat", 101)
    assert closed["server"] == f"{LOOPBACK}:{chat.port}"
    assert closed["duration"] >= 0
    assert not proc.matching(lambda line: "not_json" in line or "worker" in line)


HEX32 = re.compile(rb"[0-9a-f]{32}")


def test_a_bad_header_after_a_good_request_line_logs_method_and_path(make_proxy, logs):
    """Regression (issue 11): a 400 logged `method="" path=""` when the request line parsed."""
    proxy = make_proxy(proxy_yaml(1))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"POST /upload?token=x HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n")
        status, _, _, _ = read_response(sock)
    assert status == 400
    assert eventually(lambda: access_records(logs))
    (line,) = access_records(logs)
    assert (line["method"], line["path"], line["status"]) == ("POST", "/upload", 400)
    assert "query" not in line


@pytest.mark.parametrize(("query_on", "expected"), [(False, None), (True, "token=abc&x=1")])
def test_query_is_logged_only_when_asked(make_proxy, raw_upstream, logs, query_on, expected):
    up = raw_upstream(respond_ok_forever)
    keys = {"access_log": {"query": True}} if query_on else {}
    proxy = make_proxy(proxy_yaml(up.port, **keys))
    http(proxy.address, "/ws?token=abc&x=1", host="app.test", close=False)
    assert eventually(lambda: access_records(logs))
    (line,) = access_records(logs)
    assert line.get("query") == expected
    assert line["path"] == "/ws"


def test_user_agent_and_upstream_timings(make_proxy, raw_upstream, logs):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port))
    with raw_client(proxy.address) as sock:
        for _ in range(2):  # the second request reuses the pooled upstream connection
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: probe/1.0\r\n\r\n")
            assert read_response(sock)[0] == 200
    assert eventually(lambda: len(access_records(logs)) == 2)
    first, second = access_records(logs)
    assert first["user_agent"] == second["user_agent"] == "probe/1.0"
    assert 0 < first["upstream_connect"] <= first["upstream_header"] <= first["duration"]
    assert second["upstream_connect"] == 0
    assert second["upstream_header"] > 0
    assert len(up.conns) == 1


def test_a_client_sent_certificate_subject_never_reaches_the_upstream(
    make_proxy, raw_upstream, logs
):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, trusted_proxies=["127.0.0.1"]))
    http(proxy.address, host="app.test", close=False, extra=b"X-Client-Cert-Subject: CN=admin\r\n")
    assert values(up.accept().heads[0], b"X-Client-Cert-Subject") == []


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000, 431),  # head never ends
        (b"GET /big HTTP/1.1\r\nHost: a\r\n", 408),  # too slow
    ],
    ids=["whole-head-too-large", "incomplete-head-too-large", "head-too-slow"],
)
def test_rejected_heads_log_their_request_line(make_proxy, logs, sent, status):
    proxy = make_proxy(proxy_yaml(1, timeouts={"request_header": 0.3}))
    with raw_client(proxy.address) as sock:
        sock.sendall(sent)
        assert read_response(sock)[0] == status
    assert eventually(lambda: access_records(logs))
    (line,) = access_records(logs)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/big", status)
    assert HEX32.fullmatch(line["request_id"].encode())
