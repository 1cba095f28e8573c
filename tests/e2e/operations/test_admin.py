"""Contract section "Admin endpoints": /healthz, /readyz and /metrics (every contract metric
with its type, HELP and labels), other paths and methods, garbage, HEAD like GET."""

from __future__ import annotations

import contextlib
import re
import socket

from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import (
    LOOPBACK,
    Tunnel,
    free_port,
    http,
    read_response,
    read_response_head,
)
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.metrics import value as total
from tests.support.peers import echo_after_switch, respond_ok_forever
from tests.support.waiting import WAIT


def admin_raw(admin: int, request: bytes) -> bytes:
    """Send `request` bytes to the admin listener, return everything until it closes."""
    with socket.create_connection((LOOPBACK, admin), timeout=WAIT) as sock:
        sock.sendall(request)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


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


def test_health_ready_and_metrics_exposition(run_proxy, raw_upstream):
    """/healthz and /readyz answer 200; /metrics has every contract metric with its type,
    HELP, labels and histogram buckets, and counts what the proxy did."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    proc = run_proxy(
        config_yaml(
            {"web": web.port, "chat": chat.port, "gone": free_port()},
            [route("web", path_prefix="/http"), route("gone", path_prefix="/gone"), route("chat")],
            listen=[port],
            admin=admin,
        )
    )
    status, _, body = http(admin, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert http(admin, "/readyz")[0] == 200
    assert http(port, "/http/x")[0] == 200
    assert http(port, "/gone")[0] == 502
    tunnel = Tunnel(port, tag=1)
    assert tunnel.echo(b"x" * 1000) == b"x" * 1000
    tunnel.close()
    closed = proc.wait_log("tunnel")[0]

    status, headers, body = http(admin, "/metrics")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    text = body.decode()
    found = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [
        ("upgradeproxy_requests", "counter"),
        ("upgradeproxy_upgrades", "counter"),
        ("upgradeproxy_tunnels_active", "gauge"),
        ("upgradeproxy_tunnel_bytes", "counter"),
        ("upgradeproxy_upstream_errors", "counter"),
        ("upgradeproxy_request_duration_seconds", "histogram"),
    ]:
        assert found[name].type == kind
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# TYPE {exposed} {kind}\n" in text
        assert re.search(rf"^# HELP {exposed} \S", text, re.M)
    requests = "upgradeproxy_requests_total"
    assert total(found, requests, route="*/http", code="200") == 1
    assert total(found, requests, route="*/gone", code="502") == 1
    assert total(found, requests, route="*/", code="101") == 1
    upgrades = "upgradeproxy_upgrades_total"
    assert total(found, upgrades, route="*/", protocol="websocket", result="switched") == 1
    assert total(found, "upgradeproxy_upstream_errors_total", upstream="gone", kind="connect") >= 1
    assert total(found, "upgradeproxy_tunnels_active") == 0
    bytes_total = "upgradeproxy_tunnel_bytes_total"
    # The access log and the metrics count the same bytes: the tag and the echo.
    assert total(found, bytes_total, direction="up") == closed["bytes_in"] == 1000
    assert total(found, bytes_total, direction="down") == closed["bytes_out"] == 1001
    hist = "upgradeproxy_request_duration_seconds"
    buckets = [s for s in found[hist].samples if s.name == f"{hist}_bucket"]
    assert buckets[-1].labels == {"le": "+Inf"}
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].value == total(found, f"{hist}_count") == 3
