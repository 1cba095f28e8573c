"""The edge settings over real loopback sockets: allowed_origins (rule 12), the per-client
limit (rule 14), tunnel lifetime and spread drain (rule 13), PROXY protocol to servers (rule
15) and the per-route tunnel gauge."""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support.access_log import access_records
from tests.support.clients import (
    LOOPBACK,
    raw_client,
    read_response,
    read_response_head,
    recv_exactly,
)
from tests.support.configs import listener, proxy_yaml
from tests.support.metrics import metrics_text
from tests.support.peers import RawConn, accept_upgrade, echo, respond_ok_forever
from tests.support.processes import run_cli
from tests.support.waiting import WAIT, eventually
from tests.support.wire import proxy_v1_header, proxy_v2_header, ws_request


def chat_request(path: bytes = b"/", extra: bytes = b"") -> bytes:
    """A WebSocket handshake to chat.example.com; `extra` adds header lines (with their CRLF)."""
    return ws_request(*extra.splitlines(), target=path, host=b"chat.example.com")


# --- rule 12: allowed_origins ----------------------------------------------------------------

ORIGINS = {
    "allowed_origins": [
        "https://chat.example.com", "https://*.apps.example.com", "http://localhost:3000"
    ]
}  # fmt: skip


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        pytest.param("https://chat.example.com", True, id="exact"),
        pytest.param("https://chat.example.com:443", True, id="default-port"),
        pytest.param("https://CHAT.example.com", True, id="case"),
        pytest.param("https://eu.apps.example.com", True, id="wildcard"),
        pytest.param("https://apps.example.com", False, id="wildcard-needs-a-label"),
        pytest.param("http://localhost:3000", True, id="port"),
        pytest.param("http://localhost:3001", False, id="other-port"),
        pytest.param("https://evil.example", False, id="other-site"),
        pytest.param("null", False, id="null"),
    ],
)
def test_browser_origin_is_allowed_or_refused(make_proxy, ws_upstream, origin, allowed):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route=ORIGINS))
    if allowed:
        with connect(proxy.url("/chat"), origin=origin, open_timeout=WAIT) as ws:  # type: ignore[arg-type]
            ws.send("hi")
            assert ws.recv(timeout=WAIT) == "hi"
        assert len(up.requests) == 1
        return
    with pytest.raises(InvalidStatus) as info:
        connect(proxy.url("/chat"), origin=origin, open_timeout=WAIT)  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    assert up.requests == []  # never reached the upstream


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"Origin: \xff\xfe garbage\x7f\r\n", id="bytes"),
        pytest.param(b"Origin: https://\r\n", id="no-host"),
        pytest.param(b"Origin: https://chat.example.com/path\r\n", id="path"),
        pytest.param(b"Origin: https://chat.example.com:99999\r\n", id="bad-port"),
        pytest.param(
            b"Origin: https://chat.example.com\r\nOrigin: https://chat.example.com\r\n",
            id="two-headers",
        ),
    ],
)
def test_malformed_origin_is_a_403_never_a_500(make_proxy, raw_upstream, extra, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route=ORIGINS))
    with raw_client(proxy.address) as sock:
        sock.sendall(chat_request(b"/", extra))
        status, _, body, _ = read_response(sock)
    assert (status, body) == (403, b"403 Forbidden\n")
    assert up.conns == []
    assert eventually(lambda: access_records(caplog, "http"))
    assert "Origin" in str(access_records(caplog, "http")[-1]["error"])


def test_no_origin_and_plain_http_are_not_checked(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, route=ORIGINS))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n")
        assert read_response(sock)[0] == 200
    with raw_client(proxy.address) as sock:
        sock.sendall(chat_request())  # no Origin: not a browser
        assert read_response(sock)[0] == 200  # the raw upstream declines with a 200


def test_origin_refusals_are_counted_by_route(make_proxy, ws_upstream):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route={"path_prefix": "/ws", **ORIGINS}))
    for _ in range(2):
        with raw_client(proxy.address) as sock:
            sock.sendall(chat_request(b"/ws", b"Origin: https://evil.example\r\n"))
            assert read_response(sock)[0] == 403
    text = proxy.telemetry.render()
    assert 'upgradeproxy_origin_refusals_total{route="*/ws"} 2.0' in text


# --- rule 14: limits.max_connections_per_ip ---------------------------------------------------


def limited_request(proxy, extra: bytes = b"") -> tuple[int, dict[bytes, bytes], bool]:
    """(status, headers, closed after) for a first request on a new connection."""
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n%s\r\n" % extra)
        status, headers, _, rest = read_response(sock)
        sock.settimeout(WAIT)
        closed = status == 429 and not rest and sock.recv(1) == b""
    return status, headers, closed


def test_limit_refuses_with_429_then_recovers_after_a_close(make_proxy, ws_upstream, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, limits={"max_connections_per_ip": 2}))
    # A keep-alive HTTP connection counts as much as a tunnel does.
    held = raw_client(proxy.address)
    held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    read_response(held)  # the websockets upstream answers a plain GET with an error page
    with connect(proxy.url("/a"), open_timeout=WAIT) as first:
        status, headers, closed = limited_request(proxy)
        assert (status, headers[b"connection"], closed) == (429, b"close", True)
        assert eventually(lambda: any(r["status"] == 429 for r in access_records(caplog, "http")))
        refusal = next(r for r in access_records(caplog, "http") if r["status"] == 429)
        assert "max_connections_per_ip" in str(refusal["error"])
        text = proxy.telemetry.render()
        assert 'upgradeproxy_limit_refusals_total{route="*/"} 1.0' in text
        first.close()
        # Recovery: the closed tunnel gives its slot back.
        assert eventually(lambda: limited_request(proxy)[0] != 429)
    held.close()
    assert eventually(lambda: proxy.call(lambda: dict(proxy.proxy.shared.per_ip.counts)) == {})


def test_idle_connections_hold_their_slots_from_the_accept(make_proxy, raw_upstream):
    """A client holding connections that have sent nothing yet holds them all the same."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, limits={"max_connections_per_ip": 2}))
    idle = [raw_client(proxy.address), raw_client(proxy.address)]
    try:
        assert eventually(lambda: proxy.call(lambda: dict(proxy.proxy.shared.per_ip.counts))
                          == {LOOPBACK: 2})  # fmt: skip
        assert limited_request(proxy)[0] == 429
        idle[0].close()
        assert eventually(lambda: limited_request(proxy)[0] == 200)
    finally:
        for sock in idle:
            sock.close()


def test_limit_counts_the_client_behind_a_trusted_proxy(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        proxy_yaml(up.port, limits={"max_connections_per_ip": 1}, trusted_proxies=["127.0.0.0/8"])
    )
    held = raw_client(proxy.address)
    try:
        held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n")
        assert read_response(held)[0] == 200
        assert limited_request(proxy, b"X-Forwarded-For: 198.51.100.7\r\n")[0] == 429
        assert limited_request(proxy, b"X-Forwarded-For: 198.51.100.8\r\n")[0] == 200
        # A trusted hop between is skipped: the client is still 198.51.100.7.
        extra_hop = b"X-Forwarded-For: 198.51.100.7, 127.0.0.9\r\n"
        assert limited_request(proxy, extra_hop)[0] == 429
    finally:
        held.close()


# --- rule 13: tunnel lifetime and spread drain ------------------------------------------------

# The real clock: the proxy runs in its own thread, so wake-ups on a loaded 2-core machine can
# be late. A tunnel is never closed early (the jitter only adds), so the lower bound allows
# only the client thread's own wake-up lag after the 101 (10 ms); the upper bound, 1.1 s,
# gets LATE_MARGIN for the proxy's and the client's wake-ups after the close.
LATE_MARGIN = 0.4


def open_tunnel(proxy) -> tuple[socket.socket, float]:
    """A raw WebSocket tunnel through `proxy` and the moment its 101 arrived."""
    sock = raw_client(proxy.address, timeout=WAIT)
    sock.sendall(chat_request(b"/"))
    head, rest = read_response_head(sock)
    switched = time.monotonic()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert not rest
    return sock, switched


def closed_at(sock: socket.socket) -> float:
    """Read until the proxy closes `sock`; when it did."""
    while sock.recv(65536):
        pass
    return time.monotonic()


def test_tunnel_lifetime_closes_between_1_0_and_1_1_s(make_proxy, ws_upstream, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"tunnel_max_lifetime": 1}))
    tunnels = [open_tunnel(proxy) for _ in range(3)]
    for sock, switched in tunnels:
        with sock:
            sock.settimeout(WAIT)
            lived = closed_at(sock) - switched
            assert 1.0 - 0.01 <= lived <= 1.1 + LATE_MARGIN, lived
    assert eventually(lambda: len(access_records(caplog, "tunnel")) == 3)
    assert {r["first_close"] for r in access_records(caplog, "tunnel")} == {"lifetime"}


def test_without_lifetime_a_tunnel_stays_open(make_proxy, ws_upstream):
    """`tunnel_max_lifetime: 0` is no limit: a tunnel outlives one opened after it through a
    proxy with a 1 s lifetime (whose close is the sentinel: a second has passed)."""
    up = ws_upstream()
    forever = make_proxy(proxy_yaml(up.port, timeouts={"tunnel_max_lifetime": 0}))
    limited = make_proxy(proxy_yaml(up.port, timeouts={"tunnel_max_lifetime": 1}))
    with connect(forever.url("/"), open_timeout=WAIT) as ws:
        sentinel, _ = open_tunnel(limited)
        with sentinel:
            closed_at(sentinel)
        ws.send("still here")
        assert ws.recv(timeout=WAIT) == "still here"


def close_times(socks: list[socket.socket], since: float, limit: float) -> list[float]:
    """Seconds after `since` at which the proxy closed each socket (watched with select)."""
    import selectors

    found: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        while len(found) < len(socks) and time.monotonic() - since < limit:
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    found[sock] = time.monotonic() - since
                    sel.unregister(sock)
    assert len(found) == len(socks), f"{len(socks) - len(found)} tunnels still open"
    return sorted(found.values())


@pytest.mark.slow
def test_spread_drain_closes_tunnels_across_the_window(make_proxy, ws_upstream, caplog):
    """12 tunnels, `drain: 4`: they close a few at a time over the 4 s, not in one burst."""
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"drain": 4}, drain_tunnels="spread"))
    socks = [open_tunnel(proxy)[0] for _ in range(12)]
    started = time.monotonic()
    proxy.drain()
    times = close_times(socks, started, 4 + LATE_MARGIN + 1)
    for sock in socks:
        sock.close()
    assert len({int(t) for t in times}) >= 3, times  # at least 3 distinct 1-second buckets
    assert times[-1] - times[0] >= 2.5, times  # evenly over 4 s: the ends are 3.67 s apart
    assert times[-1] <= 4 + LATE_MARGIN, times
    assert eventually(lambda: len(access_records(caplog, "tunnel")) == 12)
    assert {r["first_close"] for r in access_records(caplog, "tunnel")} == {"drain"}


def test_wait_drain_keeps_tunnels_until_the_window_ends(make_proxy, ws_upstream):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"drain": 1}))
    socks = [open_tunnel(proxy)[0] for _ in range(4)]
    started = time.monotonic()
    proxy.drain()
    times = close_times(socks, started, 1 + LATE_MARGIN + 1)
    for sock in socks:
        sock.close()
    assert times[0] >= 1.0 - 0.01, times  # none before the drain window ends


# --- rule 15: PROXY protocol to servers -------------------------------------------------------


def read_proxy(conn: RawConn, version: int) -> bytes:
    """The PROXY header at the start of what `conn` received."""
    if version == 1:
        line = b""
        while not line.endswith(b"\r\n"):
            line += conn.read_exactly(1)
        return line
    fixed = conn.read_exactly(16)
    return fixed + conn.read_exactly(struct.unpack("!H", fixed[14:16])[0])


def expected_header(version: int, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    if version == 1:
        return proxy_v1_header(src, dst)
    return proxy_v2_header(src, dst[1], dst[0])


def proxy_then_echo(version: int, headers: list[bytes]):
    """A raw upstream that records each connection's PROXY header, then switches and echoes."""

    def handle(conn: RawConn) -> None:
        headers.append(read_proxy(conn, version))
        accept_upgrade(conn)
        echo(conn)

    return handle


@pytest.mark.parametrize("version", [1, 2])
def test_tunnel_upstream_reads_the_exact_proxy_header(make_proxy, raw_upstream, version):
    headers: list[bytes] = []
    up = raw_upstream(proxy_then_echo(version, headers))
    proxy = make_proxy(proxy_yaml(up.port, upstream={"proxy_protocol": f"v{version}"}))
    sock, _ = open_tunnel(proxy)
    with sock:
        source = sock.getsockname()
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
    assert headers == [expected_header(version, source, (LOOPBACK, proxy.port))]


@pytest.mark.parametrize("version", [1, 2])
def test_pooled_connection_is_reused_only_for_the_client_it_named(
    make_proxy, raw_upstream, version
):
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, upstream={"proxy_protocol": f"v{version}"}))
    clients = [raw_client(proxy.address), raw_client(proxy.address)]
    try:
        for i, sock in enumerate(clients):
            for _ in range(2):  # keep-alive: the second request reuses the first's connection
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
                conn = up.accept(index=i)
                if len(conn.heads) == 0:
                    assert read_proxy(conn, version) == expected_header(
                        version, sock.getsockname(), (LOOPBACK, proxy.port)
                    )
                conn.read_head()
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                assert read_response(sock)[0] == 200
        # One upstream connection per client, never one client's reused for the other.
        assert len(up.conns) == 2
        assert [len(c.heads) for c in up.conns] == [2, 2]
    finally:
        for sock in clients:
            sock.close()


def test_proxy_listener_source_is_what_goes_upstream(make_proxy, raw_upstream):
    headers: list[bytes] = []
    up = raw_upstream(proxy_then_echo(1, headers))
    proxy = make_proxy(
        proxy_yaml(up.port, upstream={"proxy_protocol": "v1"},
                   listen=listener(proxy_protocol=True))
    )  # fmt: skip
    with raw_client(proxy.address) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.5 192.0.2.1 4242 443\r\n")
        sock.sendall(chat_request(b"/", b"X-Forwarded-For: 6.6.6.6\r\n"))
        head, _ = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    assert headers == [b"PROXY TCP4 203.0.113.5 127.0.0.1 4242 %d\r\n" % proxy.port]


# --- metrics ----------------------------------------------------------------------------------


def scrape(proxy) -> str:
    return metrics_text(proxy.admin_port)


def test_tunnel_gauge_is_labelled_by_route_and_protocol_on_metrics(make_proxy, ws_upstream):
    up = ws_upstream()
    route = {"host": "chat.example.com", "path_prefix": "/ws"}
    proxy = make_proxy(proxy_yaml(up.port, route=route, admin=0))
    sample = 'upgradeproxy_tunnels_active{protocol="websocket",route="chat.example.com/ws"}'
    with raw_client(proxy.address) as sock:
        sock.sendall(chat_request(b"/ws/room"))
        assert read_response_head(sock)[0].startswith(b"HTTP/1.1 101 ")
        assert eventually(lambda: f"{sample} 1.0" in scrape(proxy))
    assert eventually(lambda: f"{sample} 0.0" in scrape(proxy))


def test_check_reports_bad_edge_values_with_file_and_line(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(
        proxy_yaml(
            9000,
            route={"allowed_origins": ["https://chat.example.com/ws", "chat.example.com"]},
            upstream={"proxy_protocol": "v3"},
            timeouts={"tunnel_max_lifetime": "500ms"},
            limits={"max_connections_per_ip": -1},
            drain_tunnels="later",
        )
    )
    done = run_cli("check", "--config", str(path))
    assert done.returncode == 1, done
    lines = [line for line in done.stderr.splitlines() if line.startswith(str(path))]
    for field in (
        "routes[0].allowed_origins[0]",
        "routes[0].allowed_origins[1]",
        "upstreams.app.proxy_protocol",
        "timeouts.tunnel_max_lifetime",
        "limits.max_connections_per_ip",
        "drain_tunnels",
    ):
        assert any(f"{path}:" in line and f": {field}: " in line for line in lines), (field, lines)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("version", [1, 2])
def test_health_checks_start_with_a_proxy_header_naming_the_proxy(make_proxy, version):
    """Rule 15: health checks too, with the proxy's own address as the source."""
    server = socket.create_server((LOOPBACK, 0))
    server.settimeout(WAIT)
    port = server.getsockname()[1]
    check = {"path": "/healthz", "interval": "0.2s", "timeout": "2s"}
    make_proxy(
        proxy_yaml(port, upstream={"proxy_protocol": f"v{version}", "health_check": check})
    )
    try:
        sock, peer = server.accept()
    finally:
        server.close()
    with sock:
        sock.settimeout(WAIT)
        conn = RawConn(sock)
        assert read_proxy(conn, version) == expected_header(version, peer, (LOOPBACK, port))
        assert conn.read_head().startswith(b"GET /healthz HTTP/1.1\r\n")
