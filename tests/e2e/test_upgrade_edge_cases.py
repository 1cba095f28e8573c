"""Upgrade edge cases (rules 1 and 2): offers split over repeated fields, interim responses,
101s naming several or unoffered protocols or carrying framing headers, FINs around the 101,
early bytes held until it.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.sentinels import client_answered_by_the_proxy, nothing_more_upstream
from tests.support.waiting import WAIT, eventually
from tests.support.wire import (
    SWITCH_WS,
    WS_ACCEPT,
    assert_short_error,
    elements,
    names,
    status_of,
    values,
    ws_request,
)

# --- rule 1 and 2: upgrade variants ----------------------------------------------------------


def test_offer_split_over_repeated_connection_and_upgrade_fields(make_proxy, raw_upstream):
    """Rule 1: "A request whose `Connection` header lists `upgrade` and whose `Upgrade` header
    offers protocols goes upstream with `Connection: upgrade` and an `Upgrade` header holding
    only the protocols the route allows, in the client's order"; tokens "match
    case-insensitively". RFC 9110 §5.3: repeated fields are one comma list; empty list
    elements are ignored (§5.6.1)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            ws_request(
                b"Upgrade: ,,WebSocket,,",
                b"Connection: UPGRADE",
                connection=b"keep-alive",
                upgrade=b"foo/1",
            )
        )
        conn = up.accept()
        head = conn.read_head()
        assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
        assert elements(head, b"upgrade") == [b"WebSocket"], head
        conn.send(SWITCH_WS)
        resp, buf = read_response_head(sock)
        assert status_of(resp) == 101
        sock.sendall(b"up!")
        assert conn.read_exactly(3) == b"up!"
        conn.send(b"down!")
        assert recv_exactly(sock, 5, buf) == b"down!"


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


def test_empty_upgrade_value_is_no_offer(make_proxy, raw_upstream):
    """Rule 1: only an `Upgrade` header that "offers protocols" is an offer; rule 2: "a 101 to
    a request that offered none ... is a 502"."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(upgrade=b""))
        conn = up.accept()
        head = conn.read_head()
        assert b"upgrade" not in names(head), head
        assert b"upgrade" not in [t.lower() for t in elements(head, b"connection")], head
        conn.send(SWITCH_WS + b"TUNNEL")
        status, _, _, buf = read_response(sock)
        assert status == 502
        assert b"TUNNEL" not in client_answered_by_the_proxy(sock, buf)


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


def test_a_mebibyte_of_early_bytes_is_held_then_delivered_in_order(make_proxy, raw_upstream):
    """Rule 2: "Bytes the client sent behind its request head are held (up to a small bound)
    and reach the upstream only after that 101"; rule 5: "Bytes are never reordered,
    duplicated or dropped." A client that sends 1 MiB right behind its handshake: nothing of
    it reaches the upstream before the 101, all of it after, in order."""
    early = hashlib.sha256(b"early").digest() * (32 * 1024)  # 1 MiB
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address, timeout=WAIT) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(ws_request() + early)

        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        conn = up.accept()
        conn.read_head()
        nothing_more_upstream(proxy, conn)  # no early byte goes up before the 101
        conn.send(SWITCH_WS)
        head, _ = read_response_head(sock)
        assert status_of(head) == 101
        assert conn.read_exactly(len(early), timeout=WAIT) == early
        writer.join(WAIT)


def test_early_final_answer_then_reuse(make_proxy, raw_upstream):
    """Rule 6: "keep-alive on both sides, ... streamed bodies in both directions". An upstream
    may answer before it read the body (README: "the client connection then closes after the
    response"). A client that finishes its body and reuses the connection must then have been
    told so (RFC 9112 §9.6: `Connection: close` in that response), or be served."""

    def handler(conn: RawConn) -> None:
        conn.read_head(timeout=WAIT)
        conn.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
        respond_ok_forever(conn)

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        status, headers, body, rest = read_response(sock)
        assert (status, body) == (403, b"nope")
        if headers.get(b"connection", b"").lower() == b"close":
            _, closed = read_to_eof(sock, 5)
            assert closed
            return
        sock.sendall(b"0123456789GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _, _ = read_response(sock, rest)
        assert status == 200
