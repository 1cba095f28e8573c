"""Contract section "Admin endpoints": paths, methods and garbage, HEAD like GET, and metrics
that follow known traffic.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import threading

from tests.support.clients import (
    LOOPBACK,
    free_port,
    http,
    read_response,
    read_response_head,
    recv_exactly,
    ws_upgrade,
)
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.metrics import scrape, value
from tests.support.peers import RawConn, echo_after_switch, respond_ok_forever
from tests.support.waiting import WAIT, eventually
from tests.support.wire import SWITCH_WS, WS_ACCEPT, WS_HEADERS, ok_response


def admin_raw(admin: int, request: bytes) -> bytes:
    """Send `request` bytes to the admin listener, return everything until it closes."""
    with socket.create_connection((LOOPBACK, admin), timeout=WAIT) as sock:
        sock.sendall(request)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


# --- Admin endpoints -------------------------------------------------------------------------


def test_admin_paths_methods_and_garbage(run_proxy, raw_upstream):
    """`/healthz` 200 while the process runs. `/readyz` 200 while accepting. `/metrics` in
    Prometheus text format. (Anything else is a 404; a query string does not change the path;
    several requests share a keep-alive connection; garbage costs only its connection.)"""
    up = raw_upstream(respond_ok_forever)
    admin = free_port()
    proc = run_proxy(proxy_yaml(up.port, admin=admin))
    for path in ("/", "/nope", "/healthz/x", "/metricsz", "/HEALTHZ"):
        assert http(admin, path)[0] == 404, path
    assert http(admin, "/healthz?probe=1")[0] == 200
    assert http(admin, "/readyz?verbose")[0] == 200
    with socket.create_connection((LOOPBACK, admin), timeout=WAIT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" * 2)
        first, _, _, rest = read_response(sock)
        assert (first, read_response(sock, rest)[0]) == (200, 200)
    reply = admin_raw(
        admin,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    assert re.match(rb"HTTP/1\.1 (200|405) ", reply), reply
    admin_raw(admin, b"\x16\x03\x01garbage\r\n\r\n")  # not HTTP: that connection ends
    assert http(admin, "/healthz")[0] == 200  # still serving after garbage
    assert proc.alive()


def test_admin_head_answers_like_get(run_proxy, raw_upstream):
    """`/healthz` 200 while the process runs. `/readyz` 200 while accepting. `/metrics` in
    Prometheus text format. (A HEAD gets GET's status and headers: RFC 9110 §8.6, a server
    MUST NOT send a Content-Length in a HEAD response unless it equals GET's content length.)"""
    up = raw_upstream(respond_ok_forever)
    admin = free_port()
    run_proxy(proxy_yaml(up.port, admin=admin))
    for path in ("/healthz", "/readyz", "/metrics", "/nope"):
        get_status, get_headers, get_body = http(admin, path)
        with socket.create_connection((LOOPBACK, admin), timeout=WAIT) as sock:
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            head, rest = read_response_head(sock)
            while data := sock.recv(65536):
                rest += data
        lines = head.split(b"\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, v in (x.split(b":", 1) for x in lines[1:] if x)
        }
        assert int(lines[0].split()[1]) == get_status, path
        assert rest == b"", path  # no body after a HEAD response head
        assert headers.get(b"content-type") == get_headers[b"content-type"], path
        if b"content-length" in headers:
            assert int(headers[b"content-length"]) == len(get_body), (path, head)


def test_metrics_follow_known_traffic(run_proxy, raw_upstream):
    """`/metrics` in Prometheus text format, at least: `upgradeproxy_requests_total{route,code}`,
    `upgradeproxy_upgrades_total{route,protocol,result}`, `upgradeproxy_tunnels_active`,
    `upgradeproxy_tunnel_bytes_total{direction}`,
    `upgradeproxy_upstream_errors_total{upstream,kind}`,
    `upgradeproxy_request_duration_seconds` (histogram). Each moves with known traffic: a
    declined and a rejected upgrade, a refused, a reset and a slow upstream, a tunnel."""
    hold = threading.Event()

    def decline(conn: RawConn) -> None:
        conn.read_head()
        conn.send(ok_response(b"no upgrade here"))

    def bad_switch(conn: RawConn) -> None:
        conn.read_head()
        conn.send(SWITCH_WS.replace(WS_ACCEPT, base64.b64encode(b"x" * 20)))

    def reset(conn: RawConn) -> None:
        conn.read_head()
        conn.close()

    def slow(conn: RawConn) -> None:
        conn.read_head()
        hold.wait(WAIT)

    ups = {
        "web": raw_upstream(respond_ok_forever), "decl": raw_upstream(decline),
        "bad": raw_upstream(bad_switch), "rst": raw_upstream(reset),
        "slow": raw_upstream(slow), "chat": raw_upstream(echo_after_switch(b"T")),
    }  # fmt: skip
    port, admin = free_port(), free_port()
    servers = {name: up.port for name, up in ups.items()} | {"gone": free_port()}
    run_proxy(
        config_yaml(servers, [route(name, path_prefix=f"/{name}") for name in servers],
                    listen=port, admin=admin, timeouts={"upstream_response": "500ms"})
    )  # fmt: skip
    try:
        start = scrape(admin)
        assert http(port, "/web/a")[0] == 200
        assert http(port, "/nothing")[0] == 404
        assert http(port, "/gone")[0] == 502
        assert http(port, "/rst")[0] == 502
        assert http(port, "/slow")[0] == 504
        assert http(port, "/decl", extra=WS_HEADERS, close=False)[0] == 200
        assert http(port, "/bad", extra=WS_HEADERS, close=False)[0] == 502
        with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
            buf = ws_upgrade(sock, "/chat")
            assert recv_exactly(sock, 1, buf) == b"T"
            sock.sendall(b"u" * 1234)
            assert recv_exactly(sock, 1234, buf) == b"u" * 1234
            assert value(scrape(admin), "upgradeproxy_tunnels_active") == 1
        assert eventually(lambda: value(scrape(admin), "upgradeproxy_tunnels_active") == 0)
    finally:
        hold.set()
    found = scrape(admin)

    labels = {
        "upgradeproxy_requests_total": {"route", "code"},
        "upgradeproxy_upgrades_total": {"route", "protocol", "result"},
        "upgradeproxy_tunnels_active": {"route", "protocol"},
        "upgradeproxy_tunnel_bytes_total": {"direction"},
        "upgradeproxy_upstream_errors_total": {"upstream", "kind"},
    }
    for name, expected in labels.items():
        samples = [s for f in found.values() for s in f.samples if s.name == name]
        assert samples, name
        assert all(set(s.labels) == expected for s in samples), (name, samples)
    hist = found["upgradeproxy_request_duration_seconds"]
    assert hist.type == "histogram"
    assert {s.name for s in hist.samples} >= {
        "upgradeproxy_request_duration_seconds_bucket",
        "upgradeproxy_request_duration_seconds_count",
        "upgradeproxy_request_duration_seconds_sum",
    }
    assert all(set(s.labels) <= {"le"} for s in hist.samples)

    def delta(name: str, **kv: str) -> float:
        return value(found, name, **kv) - value(start, name, **kv)

    req = "upgradeproxy_requests_total"
    for name, code in [("*/web", "200"), ("", "404"), ("*/gone", "502"), ("*/rst", "502"),
                       ("*/slow", "504"), ("*/decl", "200"), ("*/bad", "502"),
                       ("*/chat", "101")]:  # fmt: skip
        assert delta(req, route=name, code=code) == 1, (name, code)
    assert delta(req) == 8
    upg = "upgradeproxy_upgrades_total"
    assert delta(upg, route="*/decl", protocol="websocket", result="declined") == 1
    assert delta(upg, route="*/bad", protocol="websocket", result="rejected") == 1
    assert delta(upg, route="*/chat", protocol="websocket", result="switched") == 1
    assert delta(upg) == 3
    err = "upgradeproxy_upstream_errors_total"
    assert delta(err, upstream="gone", kind="connect") == 1
    assert delta(err, upstream="rst") == 1  # closed before a response head (README: `reset`)
    assert delta(err, upstream="slow", kind="timeout") == 1
    assert delta(err, upstream="bad", kind="bad_switch") == 1
    assert delta(err) == 4
    assert delta("upgradeproxy_tunnel_bytes_total", direction="up") == 1234
    assert delta("upgradeproxy_tunnel_bytes_total", direction="down") == 1235
    assert delta("upgradeproxy_request_duration_seconds_count") == 8
    inf = value(found, "upgradeproxy_request_duration_seconds_bucket", le="+Inf")
    assert inf == value(found, "upgradeproxy_request_duration_seconds_count")
