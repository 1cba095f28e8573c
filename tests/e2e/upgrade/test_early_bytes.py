"""Rule 2, bytes around the 101: what the client sends behind its request head is held (up to a
small bound) and reaches the upstream only after the 101; what the upstream sends behind its
101 reaches the client first; after a declined upgrade the next bytes are the next request."""

from __future__ import annotations

import contextlib
import hashlib
import threading

from tests.support.clients import (
    raw_client,
    read_response,
    read_response_head,
    recv_exactly,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.sentinels import (
    nothing_more_upstream,
)
from tests.support.waiting import WAIT
from tests.support.wire import (
    CLIENT_FRAME,
    SERVER_FRAME,
    SWITCH_WS,
    assert_offer,
    ok_response,
    request,
    status_of,
    values,
    ws_request,
)


def test_early_client_bytes_held_until_101(make_proxy, raw_upstream, client):
    """Rule 2: "Bytes the client sent behind its request head are held (up to a small bound)
    and reach the upstream only after that 101" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request() + CLIENT_FRAME)
    conn = up.accept()
    assert_offer(conn.read_head(), [b"websocket"])
    nothing_more_upstream(proxy, conn)  # the frame must wait for the 101
    conn.send(SWITCH_WS)
    head, buf = read_response_head(c)
    assert status_of(head) == 101
    assert conn.read_exactly(len(CLIENT_FRAME)) == CLIENT_FRAME
    conn.send(SERVER_FRAME)
    assert recv_exactly(c, len(SERVER_FRAME), buf) == SERVER_FRAME


def test_upstream_bytes_behind_101_reach_client_first(make_proxy, raw_upstream, client):
    """Rule 2: "bytes behind the upstream's 101 head reach the client first thing after it." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    conn.read_head()
    conn.send(SWITCH_WS + SERVER_FRAME)
    head, buf = read_response_head(c)
    assert status_of(head) == 101
    assert recv_exactly(c, len(SERVER_FRAME), buf) == SERVER_FRAME
    conn.send(b"more")
    assert recv_exactly(c, 4, buf) == b"more"
    c.sendall(CLIENT_FRAME)
    assert conn.read_exactly(len(CLIENT_FRAME)) == CLIENT_FRAME


def test_early_bytes_after_declined_upgrade_are_the_next_request(make_proxy, raw_upstream, client):
    """Rule 2: "the client connection stays HTTP: what the client sends next is parsed as a
    new request and routed like any other, never passed on raw." (the next request was
    pipelined behind the upgrade request, in the same write)"""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request() + request(target=b"/next"))
    first = up.accept(0)
    first.read_head()
    nothing_more_upstream(proxy, first)
    first.send(ok_response(b"declined"))
    status, _, body, buf = read_response(c)
    assert (status, body) == (200, b"declined")
    second = up.accept(1)
    head = second.read_head()
    assert head.startswith(b"GET /next HTTP/1.1\r\n")
    assert values(head, b"via")  # it went through the proxy's request path
    second.send(ok_response(b"next"))
    status, _, body, _ = read_response(c, buf)
    assert (status, body) == (200, b"next")
    assert first.read_until_close() == b""


def test_upgrade_request_with_body_then_tunnel(make_proxy, raw_upstream, client):
    """Rules 1-3: an upgrade request with a Content-Length body: the upstream gets exactly the
    head and the body; "Bytes the client sent behind its request head are held ... and reach
    the upstream only after that 101"; then raw bytes flow both ways."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, route={"upgrade": ["spdy"]}))
    c = client(proxy)
    c.sendall(
        request(
            b"Connection: Upgrade",
            b"Upgrade: SPDY/3.1",
            b"Content-Length: 4",
            method=b"POST",
            target=b"/stream",
            body=b"ping",
        )
        + b"EARLY"
    )
    conn = up.accept()
    head = conn.read_head()
    assert head.startswith(b"POST /stream HTTP/1.1\r\n")
    assert_offer(head, [b"SPDY/3.1"])
    assert values(head, b"content-length") == [b"4"]
    assert conn.read_exactly(4) == b"ping"
    nothing_more_upstream(proxy, conn)  # EARLY waits for the 101
    conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n"
    )
    resp, buf = read_response_head(c)
    assert status_of(resp) == 101
    assert conn.read_exactly(5) == b"EARLY"
    c.sendall(b"up")
    assert conn.read_exactly(2) == b"up"
    conn.send(b"down")
    assert recv_exactly(c, 4, buf) == b"down"


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
