"""TLS on either leg and the PROXY protocol on the listener, with real peers."""

from __future__ import annotations

import socket
import ssl

import pytest
import trustme
from websockets.sync.client import connect

from tests.conftest import proxy_v2_header, read_response, respond_ok_forever


@pytest.fixture
def proxy_cert(ca, tmp_path):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "proxy.pem", tmp_path / "proxy-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def _client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_tls_listener_terminates_and_sets_proto_https(make_proxy, ws_upstream, ca, proxy_cert):
    """`tls:` on a listener terminates TLS; upstream sees X-Forwarded-Proto: https."""
    up = ws_upstream()
    cert, key = proxy_cert
    proxy = make_proxy(f"""
listen:
  - address: "127.0.0.1:0"
    tls: {{cert: "{cert}", key: "{key}"}}
upstreams: {{app: {{servers: ["127.0.0.1:{up.port}"]}}}}
routes: [{{upstream: app}}]
""")
    with connect(proxy.url("/secure", scheme="wss"), ssl=_client_ctx(ca)) as ws:
        ws.send("over tls")
        assert ws.recv() == "over tls"
    assert up.requests[0].headers["X-Forwarded-Proto"] == "https"


def test_tls_listener_rejects_plaintext_without_harming_others(
    make_proxy, ws_upstream, ca, proxy_cert
):
    """A client speaking plain HTTP to a TLS listener is dropped; the next TLS client is fine."""
    up = ws_upstream()
    cert, key = proxy_cert
    proxy = make_proxy(f"""
listen:
  - address: "127.0.0.1:0"
    tls: {{cert: "{cert}", key: "{key}"}}
upstreams: {{app: {{servers: ["127.0.0.1:{up.port}"]}}}}
routes: [{{upstream: app}}]
""")
    with socket.create_connection(proxy.address, timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := plain.recv(4096):
            data += chunk
        assert b"HTTP/1.1 200" not in data
    with connect(proxy.url("/", scheme="wss"), ssl=_client_ctx(ca)) as ws:
        ws.send("still fine")
        assert ws.recv() == "still fine"


def _proxy_to_tls_upstream(make_proxy, ws_upstream, trusted, issuer, tmp_path):
    """A proxy whose upstream speaks TLS with a cert from `issuer`, verified against `trusted`."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    issuer.issue_cert("127.0.0.1").configure_cert(server_ctx)
    up = ws_upstream(ssl=server_ctx)
    ca_path = tmp_path / "ca.pem"
    trusted.cert_pem.write_to_path(str(ca_path))
    return make_proxy(f"""
listen: [{{address: "127.0.0.1:0"}}]
upstreams:
  app:
    servers: ["127.0.0.1:{up.port}"]
    tls: {{verify: true, ca: "{ca_path}"}}
routes: [{{upstream: app}}]
""")


def test_tls_to_upstream_with_verification(make_proxy, ws_upstream, ca, tmp_path):
    """Upstream `tls: {verify: true, ca: FILE}`: the proxy speaks TLS to the upstream."""
    proxy = _proxy_to_tls_upstream(make_proxy, ws_upstream, ca, ca, tmp_path)
    with connect(proxy.url("/up-tls")) as ws:
        ws.send("to a tls upstream")
        assert ws.recv() == "to a tls upstream"


def test_tls_upstream_with_untrusted_cert_is_502(make_proxy, ws_upstream, ca, tmp_path):
    """An upstream certificate that does not verify is a connect failure: 502, not a tunnel."""
    untrusted = trustme.CA()  # signs the upstream's cert; the proxy trusts only `ca`
    proxy = _proxy_to_tls_upstream(make_proxy, ws_upstream, ca, untrusted, tmp_path)
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _, _ = read_response(sock)
    assert status == 502


def _proxy_protocol_proxy(make_proxy, upstream_port: int, trusted: str = ""):
    return make_proxy(f"""
listen:
  - address: "127.0.0.1:0"
    proxy_protocol: true
upstreams: {{app: {{servers: ["127.0.0.1:{upstream_port}"]}}}}
routes: [{{upstream: app}}]
{trusted}
""")


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
    assert up.conns == []


def test_ipv6_loopback_listener(make_proxy, raw_upstream):
    """A listener on [::1] serves IPv6 clients, and X-Forwarded-For carries the bare address."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    up = raw_upstream(respond_ok_forever)
    try:
        proxy = make_proxy(f"""
listen: [{{address: "[::1]:0"}}]
upstreams: {{app: {{servers: ["127.0.0.1:{up.port}"]}}}}
routes: [{{upstream: app}}]
""")
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    with socket.create_connection(("::1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n")
        status, _, _, _ = read_response(sock)
    assert status == 200
    assert b"X-Forwarded-For: ::1\r\n" in up.accept().heads[0]


@pytest.mark.parametrize("together", [False, True], ids=["header-alone", "header-with-hello"])
@pytest.mark.parametrize(
    ("header", "client_ip"),
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\n", "203.0.113.7", id="v1"),
        pytest.param(proxy_v2_header("198.51.100.9"), "198.51.100.9", id="v2"),
    ],
)
def test_proxy_protocol_then_tls_then_websocket(
    make_proxy, ws_upstream, ca, proxy_cert, header, client_ip, together
):
    """A PROXY header, then a TLS handshake, then a WebSocket upgrade on one connection: the
    upstream sees the PROXY source as X-Forwarded-For and https as the scheme.

    `header-with-hello` corks the socket (TCP_CORK) until the ClientHello is written, so both
    leave in one segment and the proxy's first read holds TLS bytes past the header.
    """
    if together and not hasattr(socket, "TCP_CORK"):
        pytest.skip("TCP_CORK is Linux-only")
    up = ws_upstream()
    cert, key = proxy_cert
    proxy = make_proxy(f"""
listen:
  - address: "127.0.0.1:0"
    proxy_protocol: true
    tls: {{cert: "{cert}", key: "{key}"}}
upstreams: {{app: {{servers: ["127.0.0.1:{up.port}"]}}}}
routes: [{{upstream: app}}]
""")
    sock = socket.create_connection(proxy.address, timeout=5)
    if together:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    sock.sendall(header)
    tls = _client_ctx(ca).wrap_socket(sock, server_hostname="127.0.0.1")  # the handshake
    if together:
        tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    # A ws:// URI over the TLS socket: websockets speaks the upgrade over what it is given.
    with connect(proxy.url("/pp-tls"), sock=tls, proxy=None) as ws:
        ws.send("through proxy protocol and tls")
        assert ws.recv() == "through proxy protocol and tls"
    headers = up.requests[0].headers
    assert headers.get_all("X-Forwarded-For") == [client_ip]
    assert headers["X-Forwarded-Proto"] == "https"
