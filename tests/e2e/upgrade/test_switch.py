"""Rule 2, switch only on a real 101: the 101 that names an offered protocol (with the right
Sec-WebSocket-Accept) is relayed and bytes flow; a bad 101 or a 101 nobody asked for is a 502;
any other answer is relayed as an ordinary response and the connection stays HTTP; interim
responses, framing headers and FINs around the 101."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.support.clients import (
    raw_client,
    read_response,
    read_response_head,
    read_to_eof,
    recv_exactly,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import RawConn
from tests.support.sentinels import (
    assert_502_and_no_tunnel,
    client_answered_by_the_proxy,
    next_connection_carries_sentinel,
)
from tests.support.waiting import eventually
from tests.support.wire import (
    CLIENT_FRAME,
    SERVER_FRAME,
    SWITCH_H2C,
    SWITCH_WS,
    WS_ACCEPT,
    assert_no_upgrade_offer,
    assert_offer,
    assert_short_error,
    elements,
    names,
    ok_response,
    request,
    status_of,
    values,
    ws_request,
)


def test_real_101_switches_and_bytes_flow(make_proxy, raw_upstream, client):
    """Rule 2: "Only when the upstream answers `101 Switching Protocols` with an `Upgrade`
    naming one of the protocols sent (and, for `websocket`, the right `Sec-WebSocket-Accept`)
    does the proxy relay that 101 (with its `Upgrade`/`Connection` and end-to-end headers) and
    then splice raw bytes both ways." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    assert_offer(conn.read_head(), [b"websocket"])
    conn.send(SWITCH_WS[:-2] + b"Sec-WebSocket-Protocol: chat\r\n\r\n")
    head, buf = read_response_head(c)
    assert status_of(head) == 101
    assert elements(head, b"upgrade") == [b"websocket"]
    assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"]
    assert values(head, b"sec-websocket-accept") == [WS_ACCEPT]
    assert values(head, b"sec-websocket-protocol") == [b"chat"]
    c.sendall(CLIENT_FRAME)
    assert conn.read_exactly(len(CLIENT_FRAME)) == CLIENT_FRAME
    conn.send(SERVER_FRAME)
    assert recv_exactly(c, len(SERVER_FRAME), buf) == SERVER_FRAME
    # Not HTTP any more: request-looking bytes pass through untouched.
    c.sendall(b"GET /raw HTTP/1.1\r\n\r\n")
    assert conn.read_exactly(21) == b"GET /raw HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize(
    ("upgrade_line", "answer"),
    [
        pytest.param(b"websocket", SWITCH_H2C, id="protocol-not-offered"),
        pytest.param(
            b"websocket",
            SWITCH_WS.replace(b"Upgrade: websocket", b"Upgrade: foo"),
            id="other-protocol-right-accept",
        ),
        pytest.param(
            b"websocket",
            SWITCH_WS.replace(WS_ACCEPT, b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            id="bad-accept",
        ),
        pytest.param(
            b"websocket",
            SWITCH_WS.replace(b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n", b""),
            id="missing-accept",
        ),
        pytest.param(
            b"websocket", SWITCH_WS.replace(b"Upgrade: websocket\r\n", b""), id="missing-upgrade"
        ),
    ],
)
def test_bad_101_is_502(make_proxy, raw_upstream, client, upgrade_line, answer):
    """Rule 2: "A 101 naming a protocol that was not offered, ... or a bad
    `Sec-WebSocket-Accept` is a 502." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request(upgrade=upgrade_line))
    conn = up.accept()
    conn.read_head()
    conn.send(answer + b"TUNNEL-DATA")
    assert_502_and_no_tunnel(c, conn, b"TUNNEL-DATA")


@pytest.mark.parametrize(
    "req",
    [
        pytest.param(request(target=b"/plain"), id="plain-get"),
        pytest.param(ws_request(connection=b"keep-alive"), id="upgrade-without-connection"),
        pytest.param(ws_request(method=b"POST", body=b""), id="websocket-on-post"),
    ],
)
def test_101_to_request_that_offered_none_is_502(make_proxy, raw_upstream, client, req):
    """Rule 2: "a 101 to a request that offered none ... is a 502." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(req)
    conn = up.accept()
    assert_no_upgrade_offer(conn.read_head())
    conn.send(SWITCH_WS + b"TUNNEL-DATA")
    assert_502_and_no_tunnel(c, conn, b"TUNNEL-DATA")


def test_101_to_route_allowing_none_is_502(make_proxy, raw_upstream, client):
    """Rule 2 with `upgrade: []`: the offer was stripped, so the upstream's 101 answers a
    request that offered none: "a 101 to a request that offered none ... is a 502." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, route={"upgrade": []}))
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    assert_no_upgrade_offer(conn.read_head())
    conn.send(SWITCH_WS + b"TUNNEL-DATA")
    assert_502_and_no_tunnel(c, conn, b"TUNNEL-DATA")


NON_101 = [
    pytest.param(
        b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        200,
        b"hello",
        id="200",
    ),
    pytest.param(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied", 403, b"denied", id="403"
    ),
    pytest.param(
        b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n",
        426,
        b"nope",
        id="426-chunked",
    ),
    pytest.param(
        b"HTTP/1.1 400 Bad Request\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nbad",
        400,
        b"bad",
        id="400",
    ),
]


@pytest.mark.parametrize(("answer", "status", "body"), NON_101)
def test_non_101_relayed_and_connection_stays_http(
    make_proxy, raw_upstream, client, answer, status, body
):
    """Rule 2: "Any other status is relayed as an ordinary response (its `Upgrade` header
    stripped), that upstream connection is not reused, and the client connection stays HTTP:
    what the client sends next is parsed as a new request and routed like any other, never
    passed on raw." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request())
    first = up.accept(0)
    first.read_head()
    first.send(answer)
    got_status, headers, got_body, buf = read_response(c)
    assert (got_status, got_body) == (status, body)
    assert b"upgrade" not in headers
    assert b"upgrade" not in headers.get(b"connection", b"").lower()
    assert not buf

    c.sendall(request(b"X-Second: yes", target=b"/second"))
    second = up.accept(1)
    head = second.read_head()
    assert head.startswith(b"GET /second HTTP/1.1\r\n")
    assert values(head, b"x-second") == [b"yes"]
    assert values(head, b"x-forwarded-for") == [b"127.0.0.1"]  # proxied, not tunnelled
    second.send(ok_response(b"second"))
    got_status, _, got_body, _ = read_response(c)
    assert (got_status, got_body) == (200, b"second")
    assert first.read_until_close() == b""


@pytest.mark.parametrize(
    "status_line",
    [
        pytest.param(b"HTTP/1.1 302 Found", id="302"),
        pytest.param(b"HTTP/1.1 307 Temporary Redirect", id="307"),
        pytest.param(b"HTTP/1.1 308 Permanent Redirect", id="308"),
    ],
)
def test_3xx_to_upgrade_is_relayed_not_followed(make_proxy, raw_upstream, client, status_line):
    """Rule 2: "3xx answers to an upgrade are relayed, never followed." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    location = b"http://127.0.0.1:%d/elsewhere" % up.port
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    conn.read_head()
    conn.send(
        status_line + b"\r\nLocation: " + location + b"\r\nUpgrade: websocket\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    status, headers, _, _ = read_response(c)
    assert status == int(status_line.split(b" ")[1])
    assert headers[b"location"] == location
    assert b"upgrade" not in headers
    next_connection_carries_sentinel(proxy.address, up, 1)  # the redirect was not followed
    assert conn.read_until_close() == b""


def test_upgrade_with_body_answered_at_once_is_not_a_premature_101(make_proxy, raw_upstream):
    """RFC 9110 §7.8: a server switches only once it has the complete request. An upstream
    that answers 101 the moment it has read the body is right, and must get its tunnel even
    when its 101 reaches the proxy before the proxy has noted the end of the client's body."""

    def switch_after_body(conn: RawConn) -> None:
        while True:
            conn.read_head()
            conn.read_exactly(4)
            conn.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
            conn.send(conn.read_exactly(2))

    up = raw_upstream(switch_after_body)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, route={"upgrade": ["spdy"]}))
    for _ in range(30):
        with socket.create_connection(proxy.address, timeout=5) as c:
            c.sendall(
                request(
                    b"Connection: Upgrade",
                    b"Upgrade: SPDY/3.1",
                    b"Content-Length: 4",
                    method=b"POST",
                    target=b"/stream",
                    body=b"ping",
                )
            )
            resp, buf = read_response_head(c)
            assert status_of(resp) == 101
            c.sendall(b"ok")
            assert recv_exactly(c, 2, buf) == b"ok"


def test_upgrade_with_connection_close_still_switches(make_proxy, raw_upstream):
    """Rule 1: a request "whose `Connection` header lists `upgrade`" is an offer, whatever
    else it lists; rule 2: on a valid 101 the proxy relays it "and then splice[s] raw bytes
    both ways" (`close` only concerns the HTTP connection that the 101 ends)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(connection=b"close, Upgrade"))
        conn = up.accept()
        head = conn.read_head()
        assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
        conn.send(SWITCH_WS)
        resp, buf = read_response_head(sock)
        assert status_of(resp) == 101, resp
        sock.sendall(b"up")
        assert conn.read_exactly(2) == b"up"
        conn.send(b"down")
        assert recv_exactly(sock, 4, buf) == b"down"


def test_interim_responses_before_the_101(make_proxy, raw_upstream):
    """Rule 2: "Only when the upstream answers `101 Switching Protocols` ... does the proxy
    relay that 101 ... and then splice raw bytes both ways"; RFC 9110 §15.2: a 1xx is interim,
    so a `100` or `103 Early Hints` before the 101 does not end the exchange. README: other 1xx
    are relayed to HTTP/1.1 clients."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            + SWITCH_WS
            + b"first"
        )
        seen = []
        buf = bytearray()
        while True:
            head, buf = read_response_head(sock, buf)
            seen.append(status_of(head))
            if status_of(head) not in (100, 103):
                break
        assert seen[-1] == 101, seen
        assert values(head, b"sec-websocket-accept") == [WS_ACCEPT]
        assert recv_exactly(sock, 5, buf) == b"first"
        sock.sendall(b"client")
        assert conn.read_exactly(6) == b"client"


def test_101_naming_two_offered_protocols_is_relayed(make_proxy, raw_upstream):
    """Rule 2: the proxy relays a 101 "with an `Upgrade` naming one of the protocols sent ...
    (with its `Upgrade`/`Connection` and end-to-end headers)"; RFC 9110 §7.8 lets a server
    switch to a stack of the offered protocols."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route={"upgrade": ["foo", "bar"]}, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo/2, bar\r\n\r\n"
        )
        conn = up.accept()
        assert elements(conn.read_head(), b"upgrade") == [b"foo/2", b"bar"]
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
            b"Upgrade: BAR, foo/2\r\nX-E2E: kept\r\n\r\n"
        )
        head, _ = read_response_head(sock)
        assert status_of(head) == 101
        assert [t.lower() for t in elements(head, b"upgrade")] == [b"bar", b"foo/2"]
        assert values(head, b"x-e2e") == [b"kept"]
        sock.sendall(b"ping")
        assert conn.read_exactly(4) == b"ping"


def test_101_naming_an_offered_and_an_unoffered_protocol_is_502(make_proxy, raw_upstream):
    """Rule 2: "A 101 naming a protocol that was not offered ... is a 502." (even when it also
    names one that was)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route={"upgrade": ["foo", "bar"]}, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo/2, bar\r\n\r\n"
        )
        conn = up.accept()
        conn.read_head()
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
            b"Upgrade: foo/2, h2c\r\n\r\nTUNNEL"
        )
        status, _, body, buf = read_response(sock)
        assert status == 502
        assert_short_error(body)
        # The client's next bytes are a request the proxy answers itself, never tunnel bytes.
        assert b"TUNNEL" not in client_answered_by_the_proxy(sock, buf)
        assert conn.read_until_close(timeout=5) == b""


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 5\r\n", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"],
    ids=["content-length", "content-length-and-chunked"],
)
def test_101_with_framing_and_close_headers_is_relayed_clean(make_proxy, raw_upstream, framing):
    """Rule 2: the proxy relays the 101 "with its `Upgrade`/`Connection`" and "bytes behind the
    upstream's 101 head reach the client first thing after it"; rule 3: `Connection`,
    `Keep-Alive` and `Transfer-Encoding` are removed and the proxy "frames bodies itself".
    A 101 has no body, and RFC 9110 §8.6: "A server MUST NOT send a Content-Length header
    field in any response with a status code of 1xx". So the client gets a 101 with
    `Connection: upgrade`, no framing header, and the bytes behind it as tunnel bytes."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: close, Upgrade\r\nKeep-Alive: timeout=5\r\n"
            + framing
            + b"Sec-WebSocket-Accept: "
            + WS_ACCEPT
            + b"\r\n\r\nabcde-tunnel"
        )
        head, buf = read_response_head(sock)
        assert status_of(head) == 101, head
        assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
        present = names(head)
        assert b"keep-alive" not in present, head
        assert b"transfer-encoding" not in present, head
        assert b"content-length" not in present, head
        assert recv_exactly(sock, 12, buf) == b"abcde-tunnel"
        sock.sendall(b"up")
        assert conn.read_exactly(2) == b"up"


def test_101_then_bytes_then_fin_in_one_go(make_proxy, raw_upstream):
    """Rule 2: "bytes behind the upstream's 101 head reach the client first thing after it";
    rule 5: "Half-closes are propagated (a FIN one way does not cut the other way)" - even when
    the upstream's FIN arrives together with its 101."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(SWITCH_WS + b"server-done")
        conn.sock.shutdown(socket.SHUT_WR)
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        data, closed = read_to_eof(sock, 5)
        assert bytes(buf) + data == b"server-done"
        assert closed
        sock.sendall(b"client-after-fin")
        assert conn.read_exactly(16) == b"client-after-fin"
        sock.shutdown(socket.SHUT_WR)
        assert conn.read_until_close(timeout=5) == b""
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0)


def test_101_then_immediate_close(make_proxy, raw_upstream):
    """Rule 5: when the upstream is gone right after its 101, the client gets the 101 then EOF,
    and the tunnel is finished (`upgradeproxy_tunnels_active` back to 0)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(SWITCH_WS)
        conn.close()
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        data, closed = read_to_eof(sock, 5)
        assert bytes(buf) + data == b""
        assert closed
        sock.close()
    assert eventually(lambda: proxy.tunnels_active() == 0)


def test_client_fin_before_the_101(make_proxy, raw_upstream):
    """Rule 5: "Half-closes are propagated (a FIN one way does not cut the other way)": a client
    that sends its handshake then FIN still gets the 101 and what follows; the upstream sees
    the FIN after the 101, and can keep talking until it closes."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request() + b"early")
        sock.shutdown(socket.SHUT_WR)
        conn = up.accept()
        conn.read_head()
        proxy.settle()  # the proxy has seen the FIN before the 101 comes
        conn.send(SWITCH_WS + b"hello")
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        assert recv_exactly(sock, 5, buf) == b"hello"
        assert conn.read_until_close(timeout=5) == b"early"  # then the client's FIN
        conn.send(b"after-your-fin")
        assert recv_exactly(sock, 14, buf) == b"after-your-fin"
        conn.close()
        data, closed = read_to_eof(sock, 5)
        assert bytes(buf) + data == b""
        assert closed


SWITCH_SPDY = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n"
)


def test_101_before_the_body_is_complete_is_502_and_both_sides_close(make_proxy, raw_upstream):
    """The upstream answers 101 after reading only the head of a POST upgrade whose 4-byte
    body the client has sent half of: the client gets a 502, the upstream a close, and the
    missing half never reaches the upstream (no tunnel was opened)."""
    upstream_saw: list[bytes] = []
    upstream_done = threading.Event()

    def switch_after_head(conn: RawConn) -> None:
        try:
            conn.read_head()
            conn.send(SWITCH_SPDY)
            upstream_saw.append(conn.read_until_close(timeout=10))
        finally:
            upstream_done.set()

    up = raw_upstream(switch_after_head)
    # upstream_response bounds how long the proxy waits for the rest of the body after the 101.
    proxy = make_proxy(
        proxy_yaml(
            up.port,
            route={"upgrade": ["spdy"]},
            timeouts={"upstream_response": 1, "drain": 1},
        )
    )
    with raw_client(proxy.address, timeout=10) as c:
        c.sendall(
            b"POST /stream HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\n"
            b"Upgrade: SPDY/3.1\r\nContent-Length: 4\r\n\r\npi"
        )
        status, headers, body, rest = read_response(c)
        assert status == 502
        assert headers.get(b"connection", b"").lower() == b"close"
        assert b"Traceback" not in body
        c.sendall(b"ng")  # the rest of the body, too late: lingered over and dropped
        more, closed = read_to_eof(c)
        assert closed, "the client connection stayed open after the 502"
        assert b"101" not in bytes(rest) + more
    assert upstream_done.wait(10), "the upstream connection was not closed"
    assert b"ng" not in upstream_saw[0]
