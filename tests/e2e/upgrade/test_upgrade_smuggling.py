"""Upgrade smuggling: the published attacks on proxies that tunnel without a real 101
(CVE-2018-1002105, CVE-2019-17567, CVE-2024-23326) and h2c smuggling (Bishop Fox, 2020), each
replayed against the proxy: no tunnel, nothing of the client's bytes passed on raw."""

from __future__ import annotations

import contextlib
import socket

import pytest

from tests.support.clients import (
    read_response,
    read_to_eof,
    readable,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.sentinels import (
    assert_502_and_no_tunnel,
    next_connection_carries_sentinel,
)
from tests.support.waiting import eventually
from tests.support.wire import (
    CLIENT_FRAME,
    H2_SERVER_PREFACE,
    H2_SETTINGS,
    SERVER_FRAME,
    SWITCH_H2C,
    SWITCH_WS,
    WS_ACCEPT,
    assert_no_upgrade_offer,
    assert_offer,
    elements,
    names,
    ok_response,
    request,
    ws_request,
)


def test_cve_2018_1002105_failed_upgrade_is_no_tunnel(make_proxy, raw_upstream, client):
    """CVE-2018-1002105 (Kubernetes API server): an upgrade request the backend refused left
    the proxied connection open as a raw tunnel, so follow-up requests reached the backend
    directly with the proxy's credentials, past its checks. Rule 2: "that upstream connection
    is not reused, and the client connection stays HTTP"."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, route={"path_prefix": "/api"}))
    c = client(proxy)
    c.sendall(ws_request(target=b"/api/exec"))
    backend = up.accept(0)
    backend.read_head()
    backend.send(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        b'Content-Length: 17\r\n\r\n{"kind":"Status"}'
    )
    status, _, body, _ = read_response(c)
    assert (status, body) == (403, b'{"kind":"Status"}')
    # The follow-up is outside every route: the proxy must answer it, not the backend.
    c.sendall(request(target=b"/internal/secrets"))
    status, _, _, _ = read_response(c)
    assert status == 404
    assert backend.read_until_close() == b""
    next_connection_carries_sentinel(proxy.address, up, 1, b"/api/sentinel")


def test_cve_2019_17567_no_tunnel_without_101(make_proxy, raw_upstream, client):
    """CVE-2019-17567 (Apache mod_proxy_wstunnel): the tunnel was set up even when the backend
    did not answer 101. Rule 2: "Any other status is relayed as an ordinary response (its
    `Upgrade` header stripped) ... never passed on raw." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request())
    backend = up.accept(0)
    backend.read_head()
    backend.send(
        b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\nContent-Length: 0\r\n\r\n"
    )
    status, headers, _, buf = read_response(c)
    assert status == 200
    assert b"upgrade" not in headers
    assert not buf
    # The client believes it is tunnelled and speaks WebSocket frames, then half-closes.
    c.sendall(CLIENT_FRAME)
    c.shutdown(socket.SHUT_WR)
    rest, closed = read_to_eof(c)
    assert closed
    assert rest == b"" or rest.startswith(b"HTTP/1.1 400 "), rest
    assert backend.read_until_close() == b""
    assert len(up.conns) == 1


@pytest.mark.parametrize(
    ("answer", "status", "body", "smuggled"),
    [
        pytest.param(
            ok_response(b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle",
            200,
            b"ok",
            b"smuggle",
            id="response-smuggled-after-200",
        ),
        pytest.param(
            ok_response(b"") + SWITCH_WS + b"TUNNEL-DATA",
            200,
            b"",
            b"TUNNEL-DATA",
            id="101-after-200",
        ),
        pytest.param(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\nTUNNEL-DATA",
            403,
            b"",
            b"TUNNEL-DATA",
            id="raw-bytes-after-403",
        ),
        pytest.param(
            SERVER_FRAME + SWITCH_WS + b"TUNNEL-DATA",
            502,
            None,
            b"Hello",
            id="tunnel-bytes-before-101",
        ),
    ],
)
def test_cve_2024_23326_upstream_bytes_outside_a_101(
    make_proxy, raw_upstream, client, answer, status, body, smuggled
):
    """CVE-2024-23326 (Envoy): bytes an upstream sent after a non-101 response (or before its
    101) were treated as tunnel data. Rule 2: "Any other status is relayed as an ordinary
    response ..., that upstream connection is not reused"; only "bytes behind the upstream's
    101 head" are tunnel data."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request())
    backend = up.accept(0)
    backend.read_head()
    backend.send(answer)
    got_status, _, got_body, buf = read_response(c)
    assert got_status == status
    if body is not None:
        assert got_body == body
    # The next request gets a fresh upstream connection, not the leftovers of the first (or
    # the proxy closes the client connection instead).
    with contextlib.suppress(OSError):
        c.sendall(request(target=b"/next"))
    assert eventually(lambda: len(up.conns) > 1 or readable(c))
    if len(up.conns) > 1:
        fresh = up.accept(1)
        assert fresh.read_head().startswith(b"GET /next HTTP/1.1\r\n")
        fresh.send(ok_response(b"fresh"))
        got_status, _, got_body, _ = read_response(c, buf)  # the very next bytes
        assert (got_status, got_body) == (200, b"fresh")
    else:
        rest, closed = read_to_eof(c)
        assert smuggled not in bytes(buf) + rest
        assert b"101" not in bytes(buf) + rest
        assert closed
    assert backend.read_until_close() == b""


H2C_VARIANTS = [
    pytest.param(
        request(
            b"Upgrade: h2c",
            b"Connection: Upgrade, HTTP2-Settings",
            b"HTTP2-Settings: " + H2_SETTINGS,
        ),
        [],
        id="classic-h2csmuggler",
    ),
    pytest.param(
        request(b"Upgrade: h2c", b"HTTP2-Settings: " + H2_SETTINGS),
        [],
        id="upgrade-without-connection",
    ),
    pytest.param(request(b"Connection: upgrade", b"Upgrade: H2C"), [], id="uppercase-h2c"),
    pytest.param(
        ws_request(
            b"HTTP2-Settings: " + H2_SETTINGS,
            connection=b"Upgrade, HTTP2-Settings",
            upgrade=b"websocket, h2c",
        ),
        [b"websocket"],
        id="websocket-and-h2c-proper-handshake",
    ),
    pytest.param(
        request(
            b"Connection: Upgrade, HTTP2-Settings",
            b"Upgrade: websocket, h2c",
            b"HTTP2-Settings: " + H2_SETTINGS,
        ),
        [],
        id="websocket-and-h2c-without-handshake",
    ),
    pytest.param(request(b"HTTP2-Settings: " + H2_SETTINGS), [], id="http2-settings-alone"),
    pytest.param(
        request(b"Connection: HTTP2-Settings", b"HTTP2-Settings: " + H2_SETTINGS),
        [],
        id="http2-settings-nominated",
    ),
]


@pytest.mark.parametrize(("req", "offer"), H2C_VARIANTS)
def test_h2c_smuggling_never_offered_never_tunnelled(make_proxy, raw_upstream, client, req, offer):
    """h2c smuggling (Bishop Fox, 2020): a proxy that forwards `Upgrade: h2c` and relays the
    backend's 101 hands the client an HTTP/2 connection straight to the backend, past every
    proxy rule. Rule 1: "an `Upgrade` header holding only the protocols the route allows";
    rule 3: `HTTP2-Settings` is hop-by-hop; rule 2: "A 101 naming a protocol that was not
    offered, a 101 to a request that offered none ... is a 502." """
    up = raw_upstream()
    # A websocket-only route (the default).
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(req)
    conn = up.accept()
    head = conn.read_head()
    assert b"http2-settings" not in names(head), head
    assert b"h2c" not in [t.lower() for t in elements(head, b"upgrade")], head
    assert b"http2-settings" not in [t.lower() for t in elements(head, b"connection")], head
    if offer:
        assert_offer(head, offer)
    else:
        assert_no_upgrade_offer(head)
    # The backend speaks h2c anyway: the client must get a 502, never an HTTP/2 tunnel.
    conn.send(SWITCH_H2C + H2_SERVER_PREFACE)
    assert_502_and_no_tunnel(c, conn, H2_SERVER_PREFACE)
