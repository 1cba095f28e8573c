"""Rule 17, what is negotiated: ALPN `h2` (preferred to `http/1.1`) on TLS listeners with
`http2: true` and never without it; in cleartext, HTTP/2 for a client whose first bytes are
the connection preface and HTTP/1.1 for every other, without delay; `h2c` Upgrade refused as
before; the proxy's SETTINGS."""

from __future__ import annotations

import socket

import h2.events
import h2.settings
import pytest

from tests.support.certs import client_context, tls_pair
from tests.support.clients import read_response
from tests.support.configs import h2_yaml, listener, proxy_yaml
from tests.support.h2_clients import H2Peer
from tests.support.peers import respond_ok_forever


def _tls_yaml(upstream_port: int, tls: dict[str, str], http2: bool) -> str:
    return proxy_yaml(upstream_port, listen=listener(http2=http2, tls=tls))


@pytest.mark.parametrize(
    ("http2", "offered", "chosen"),
    [
        pytest.param(True, ["h2", "http/1.1"], "h2", id="http2 on: h2"),
        pytest.param(True, ["http/1.1", "h2"], "h2", id="http2 on: ours first, not the client's"),
        pytest.param(True, ["http/1.1"], "http/1.1", id="http2 on: an HTTP/1.1-only client"),
        pytest.param(False, ["h2", "http/1.1"], "http/1.1", id="http2 off: never h2"),
    ],
)
def test_alpn(make_proxy, raw_upstream, tmp_path, http2, offered, chosen):
    up = raw_upstream(respond_ok_forever)
    tls, ca = tls_pair(tmp_path)
    proxy = make_proxy(_tls_yaml(up.port, tls, http2))
    with client_context(ca, offered).wrap_socket(
        socket.create_connection(proxy.address), server_hostname="localhost"
    ) as sock:
        assert sock.selected_alpn_protocol() == chosen
        if chosen == "http/1.1":
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(sock)[0] == 200


def test_http2_over_tls_forwards_https(make_proxy, raw_upstream, tmp_path):
    """Forwarding headers of a TLS stream say https; the request is the same as HTTP/1.1's."""
    up = raw_upstream(respond_ok_forever)
    tls, ca = tls_pair(tmp_path)
    proxy = make_proxy(_tls_yaml(up.port, tls, True))
    client = H2Peer(proxy.address, tls=client_context(ca, ["h2", "http/1.1"]))
    assert client.response(client.request("/secure"))[0] == 200
    head = up.accept().heads[0]
    assert b"X-Forwarded-Proto: https" in head
    assert head.startswith(b"GET /secure HTTP/1.1\r\n")


def test_cleartext_prior_knowledge_and_http1_share_a_listener(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    assert client.response(client.request("/two"))[0] == 200
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"G", id="one byte that is not the preface's"),
        pytest.param(b"P", id="one byte that is: waits for more, then HTTP/1.1"),
        pytest.param(b"PRI * HTTP/1.1\r\n", id="PRI but not the preface"),
    ],
)
def test_http1_clients_are_not_held_by_the_preface_check(make_proxy, raw_upstream, first):
    """A request whose first bytes differ from the preface is HTTP/1.1 at once; bytes that
    still match are waited on only until they stop matching; every byte reaches h11."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    request = b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
    with socket.create_connection(proxy.address, timeout=5) as sock:
        if first == b"P":
            sock.sendall(b"P")
            sock.sendall(b"OST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        elif first == b"G":
            sock.sendall(b"G")
            sock.sendall(request[1:])
        else:
            sock.sendall(first + b"Host: a\r\n\r\n")
        status = read_response(sock)[0]
    assert status == (400 if first.startswith(b"PRI") else 200)


def test_h2c_upgrade_stays_refused(make_proxy, raw_upstream):
    """`Upgrade: h2c` is not ours to take: the offer is stripped (the default route allows
    only websocket) and the request goes upstream as plain HTTP/1.1."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        status = read_response(sock)[0]
    assert status == 200
    upstream_head = up.accept().heads[0].lower()
    assert b"h2c" not in upstream_head
    assert b"http2-settings" not in upstream_head


def test_settings_enable_connect_protocol_and_limits(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        h2_yaml(
            up.port,
            limits={"http2_max_concurrent_streams": 7, "max_request_header_bytes": 9000},
        )
    )
    client = H2Peer(proxy.address)
    assert client.until(
        lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.events)
    )
    settings = client.conn.remote_settings
    assert settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
    assert settings.max_concurrent_streams == 7
    assert settings.max_header_list_size == 9000


def test_without_http2_a_preface_is_an_http1_error(make_proxy, raw_upstream):
    """`http2: false` (the default) keeps cleartext listeners HTTP/1.1 only."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port))
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 4")


@pytest.mark.parametrize("sent", [b"", b"PRI * HT"], ids=["nothing", "part of the preface"])
def test_a_client_that_stalls_gets_the_http1_408(make_proxy, raw_upstream, sent):
    """Rule 7's 408 holds on an `http2` listener too: a client that stops before the
    preface check could decide is HTTP/1.1's, and HTTP/1.1 answers it (after up to twice
    `request_header`: one for the check, one for the head)."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port, timeouts={"request_header": 0.2}))
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(sent)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert not up.conns
