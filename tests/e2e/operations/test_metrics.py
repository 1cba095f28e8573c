"""/metrics follows known traffic: requests, upgrades, tunnels and their bytes, upstream errors,
connections, connect and header timings, the process's own figures."""

from __future__ import annotations

import base64
import queue
import socket
import threading

from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import (
    LOOPBACK,
    free_port,
    http,
    raw_client,
    raw_tunnel,
    read_response,
    read_response_head,
    read_until_close,
    recv_exactly,
    ws_upgrade,
)
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.metrics import metrics_text, scrape, value
from tests.support.peers import RawConn, accept_upgrade, echo_after_switch, respond_ok_forever
from tests.support.waiting import WAIT, eventually
from tests.support.wire import (
    SWITCH_WS,
    WS_ACCEPT,
    WS_HEADERS,
    ok_response,
    ws_request,
)


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


def sample(proxy, name: str, **labels: str) -> float:
    text = proxy.call(proxy.telemetry.render)
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def get(sock: socket.socket) -> int:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    return read_response(sock)[0]


def test_connections_active_and_limited(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, limits={"max_connections": 1}))
    first = raw_client(proxy.address)
    assert get(first) == 200
    assert sample(proxy, "upgradeproxy_connections_active") == 1
    assert sample(proxy, "upgradeproxy_connections_limited_total") == 0
    with raw_client(proxy.address) as second:  # waits in the backlog
        second.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert eventually(lambda: sample(proxy, "upgradeproxy_connections_limited_total") == 1)
        first.close()
        assert read_response(second)[0] == 200
        assert sample(proxy, "upgradeproxy_connections_active") == 1
    assert eventually(lambda: sample(proxy, "upgradeproxy_connections_active") == 0)


def test_upstream_connect_and_header_histograms_by_upstream(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port))
    with raw_client(proxy.address) as sock:
        assert get(sock) == 200
        assert get(sock) == 200  # on the pooled connection: no new connect
    connect = "upgradeproxy_upstream_connect_seconds"
    header = "upgradeproxy_upstream_header_seconds"
    assert sample(proxy, f"{connect}_count", upstream="app") == 1
    assert sample(proxy, f"{header}_count", upstream="app") == 2
    assert 0 < sample(proxy, f"{connect}_sum", upstream="app") <= sample(
        proxy, f"{header}_sum", upstream="app"
    )


def test_process_metrics_in_one_process(make_proxy):
    proxy = make_proxy(proxy_yaml(1))
    assert sample(proxy, "process_resident_memory_bytes") > 0
    assert sample(proxy, "process_open_fds") > 0


def test_tunnel_metrics_count_bytes_and_active_tunnels(make_proxy, raw_upstream):
    """`upgradeproxy_tunnels_active` counts the open tunnel and returns to 0 once it closes;
    `upgradeproxy_tunnel_bytes_total{direction}` counts exactly the bytes relayed each way (the
    handshake itself is HTTP, not tunnel bytes)."""
    up_bytes, down_bytes = 100_000, 70_000
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
            conn.send(b"d" * down_bytes)
        except BaseException as exc:
            at_upstream.put(exc)
        finally:
            conn.close()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    telemetry = proxy.telemetry
    sock, rest = raw_tunnel(proxy.address)
    with sock:
        assert eventually(lambda: telemetry.tunnels_active == 1)
        sock.sendall(b"u" * up_bytes)
        sock.shutdown(socket.SHUT_WR)
        assert at_upstream.get(timeout=WAIT) == b"u" * up_bytes
        assert read_until_close(sock, rest) == b"d" * down_bytes
    assert eventually(lambda: telemetry.tunnels_active == 0), telemetry.tunnels_active
    expected = {"up": up_bytes, "down": down_bytes}
    assert eventually(lambda: telemetry.tunnel_bytes == expected), telemetry.tunnel_bytes


def test_tunnel_gauge_is_labelled_by_route_and_protocol_on_metrics(make_proxy, ws_upstream):
    up = ws_upstream()
    route = {"host": "chat.example.com", "path_prefix": "/ws"}
    proxy = make_proxy(proxy_yaml(up.port, route=route, admin=0))
    sample = 'upgradeproxy_tunnels_active{protocol="websocket",route="chat.example.com/ws"}'
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(target=b"/ws/room", host=b"chat.example.com"))
        assert read_response_head(sock)[0].startswith(b"HTTP/1.1 101 ")
        assert eventually(lambda: f"{sample} 1.0" in metrics_text(proxy.admin_port))
    assert eventually(lambda: f"{sample} 0.0" in metrics_text(proxy.admin_port))
