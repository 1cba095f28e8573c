"""Rule 15: `proxy_protocol: v1|v2` on an upstream starts every connection to its servers with a
PROXY header naming the client (health checks: the proxy itself), and a pooled connection is
reused only for the client it named."""

from __future__ import annotations

import socket
import struct

import pytest

from tests.support.clients import (
    LOOPBACK,
    raw_client,
    raw_tunnel,
    read_response,
    read_response_head,
    recv_exactly,
)
from tests.support.configs import listener, proxy_yaml
from tests.support.peers import RawConn, accept_upgrade, echo
from tests.support.waiting import WAIT
from tests.support.wire import proxy_v1_header, proxy_v2_header, ws_request


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
    sock, rest = raw_tunnel(proxy.address, "/")
    assert rest == b""
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
        sock.sendall(ws_request(b"X-Forwarded-For: 6.6.6.6", target=b"/", host=b"chat.example.com"))
        head, _ = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    assert headers == [b"PROXY TCP4 203.0.113.5 127.0.0.1 4242 %d\r\n" % proxy.port]


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
