"""`listen.proxy_protocol: true`: a listener behind an L4 load balancer reads its PROXY v1/v2
header for the client's address (then TLS, then the request); a connection without one is
dropped."""

from __future__ import annotations

import socket

import pytest
from websockets.sync.client import connect

from tests.support.certs import client_context
from tests.support.clients import read_response
from tests.support.configs import listener, proxy_yaml
from tests.support.peers import respond_ok_forever
from tests.support.sentinels import only_the_sentinel_arrives
from tests.support.wire import proxy_v1_header, proxy_v2_header


def _proxy_protocol_proxy(make_proxy, upstream_port: int):
    return make_proxy(proxy_yaml(upstream_port, listen=listener(proxy_protocol=True)))


@pytest.mark.parametrize(
    ("header", "client_ip"),
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 80\r\n", "203.0.113.7", id="v1-ipv4"),
        pytest.param(b"PROXY TCP6 2001:db8::1 ::1 51000 80\r\n", "2001:db8::1", id="v1-ipv6"),
        pytest.param(
            proxy_v2_header("198.51.100.9", 80),
            "198.51.100.9",
            id="v2-ipv4",
        ),
    ],
)
def test_proxy_protocol_sets_client_address(make_proxy, raw_upstream, header, client_ip):
    """With `proxy_protocol`, the client address is the one the PROXY header carries."""
    up = raw_upstream(respond_ok_forever)
    proxy = _proxy_protocol_proxy(make_proxy, up.port)
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(header + b"GET /pp HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _, _ = read_response(sock)
    assert status == 200
    conn = up.accept()
    assert f"X-Forwarded-For: {client_ip}\r\n".encode() in conn.heads[0]


def test_proxy_protocol_missing_header_closes(make_proxy, raw_upstream):
    """A listener expecting PROXY drops a connection that starts with anything else."""
    up = raw_upstream(respond_ok_forever)
    proxy = _proxy_protocol_proxy(make_proxy, up.port)
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096) == b""
    header = proxy_v1_header(("203.0.113.9", 1), ("127.0.0.1", 2))
    only_the_sentinel_arrives(proxy.address, up, prefix=header)


@pytest.mark.parametrize("together", [False, True], ids=["header-alone", "header-with-hello"])
@pytest.mark.parametrize(
    ("header", "client_ip"),
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\n", "203.0.113.7", id="v1"),
        pytest.param(proxy_v2_header("198.51.100.9"), "198.51.100.9", id="v2"),
    ],
)
def test_proxy_protocol_then_tls_then_websocket(
    make_proxy, ws_upstream, ca, listener_tls, header, client_ip, together
):
    """A PROXY header, then a TLS handshake, then a WebSocket upgrade on one connection: the
    upstream sees the PROXY source as X-Forwarded-For and https as the scheme.

    `header-with-hello` corks the socket (TCP_CORK) until the ClientHello is written, so both
    leave in one segment and the proxy's first read holds TLS bytes past the header.
    """
    if together and not hasattr(socket, "TCP_CORK"):
        pytest.skip("TCP_CORK is Linux-only")
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, listen=listener(proxy_protocol=True, tls=listener_tls)))
    sock = socket.create_connection(proxy.address, timeout=5)
    if together:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    sock.sendall(header)
    tls = client_context(ca).wrap_socket(sock, server_hostname="127.0.0.1")  # the handshake
    if together:
        tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    # A ws:// URI over the TLS socket: websockets speaks the upgrade over what it is given.
    with connect(proxy.url("/pp-tls"), sock=tls, proxy=None) as ws:
        ws.send("through proxy protocol and tls")
        assert ws.recv() == "through proxy protocol and tls"
    headers = up.requests[0].headers
    assert headers.get_all("X-Forwarded-For") == [client_ip]
    assert headers["X-Forwarded-Proto"] == "https"
