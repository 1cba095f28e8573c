"""Rule 6, keep-alive on both sides: a client connection carries several requests, upstream
connections are pooled (and a dead pooled one is never trusted twice), errors and early
answers leave the connection usable, pipelined requests are answered in order."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import h11
import pytest

from tests.support.clients import (
    raw_client,
    read_response,
    read_to_eof,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.http_peers import echo_path, h11_upstream
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.waiting import WAIT, eventually
from tests.support.wire import (
    assert_short_error,
    ok_response,
)


def test_client_keep_alive_and_upstream_reuse(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        for i in range(3):
            sock.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            status, headers, body, rest = read_response(sock)
            assert (status, body, bytes(rest)) == (200, b"ok", b"")
            assert headers.get(b"connection", b"").lower() != b"close"
    assert len(up.conns) == 1


def test_upstream_connection_pooled_across_client_connections(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    for i in range(3):
        with raw_client(proxy.address) as sock:
            sock.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            status, _, body, _ = read_response(sock)
            assert (status, body) == (200, b"ok")
    assert len(up.conns) == 1


def test_pipelined_requests_answered_in_order(make_proxy, raw_upstream):
    requests: list[tuple[h11.Request, bytes]] = []
    up = raw_upstream(h11_upstream(echo_path, requests))
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        rest = bytearray()
        bodies = []
        for _ in range(3):
            status, _, body, rest = read_response(sock, rest)
            assert status == 200
            bodies.append(body)
    assert bodies == [b"GET /one", b"POST /two abc", b"GET /three"]
    assert [r.target for r, _ in requests] == [b"/one", b"/two", b"/three"]


def test_retry_after_stale_pooled_connections_goes_to_a_fresh_one(make_proxy, raw_upstream):
    """When pooled connections died (an upstream restart), a bodiless request still succeeds.

    The first pick fails on a closed keep-alive connection; the retry must not take the next
    dead one from the pool.
    """
    release = threading.Event()
    both_here = threading.Barrier(2)

    closed: list[RawConn] = []

    def answer_once_then_close(conn: RawConn) -> None:
        conn.read_head()
        # Answer only once both requests are here: a proxy that finished the first exchange
        # before reading the second would otherwise reuse this connection for it, and the
        # second request would wait on an upstream that never answers it.
        both_here.wait(10)
        conn.send(ok_response(b"first"))  # keep-alive by default: the proxy pools it
        release.wait(10)
        conn.close()  # the upstream "restarts": every idle connection goes away
        closed.append(conn)

    def answer(conn: RawConn) -> None:
        if len(up.conns) <= 2:
            answer_once_then_close(conn)
        else:
            respond_ok_forever(conn)

    up = raw_upstream(answer)
    proxy = make_proxy(proxy_yaml(up.port))
    # Two exchanges in flight at once leave two connections in the pool.
    clients = [raw_client(proxy.address) for _ in range(2)]
    for sock in clients:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    for sock in clients:
        assert read_response(sock)[0] == 200
    release.set()
    # Both closes are sent (a FIN on loopback is in the proxy's socket as close returns), and
    # the proxy has seen them.
    assert eventually(lambda: len(closed) == 2)
    proxy.settle()
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(sock)
    assert (status, body) == (200, b"ok")
    for sock in clients:
        sock.close()


def test_keep_alive_survives_an_answer_right_after_the_body(make_proxy, raw_upstream):
    """Keep-alive on both sides for requests with bodies: an upstream that answers the moment
    it has read the body must not cost the client its connection."""

    def answer_after_body(conn: RawConn) -> None:
        while True:
            conn.read_head()
            conn.read_exactly(5)
            conn.send(ok_response(b"done"))

    up = raw_upstream(answer_after_body)
    proxy = make_proxy(proxy_yaml(up.port))
    with raw_client(proxy.address) as sock:
        buf = bytearray()
        for i in range(30):
            sock.sendall(b"POST /n/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" % i)
            status, headers, body, buf = read_response(sock, buf)
            assert (status, body) == (200, b"done")
            assert headers.get(b"connection", b"").lower() != b"close"


def _reset(conn: RawConn) -> None:
    """Close with an RST (SO_LINGER 0): the proxy's next write fails instead of succeeding."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_request_on_a_reset_pooled_connection_is_sent_once_on_a_fresh_one(make_proxy, raw_upstream):
    release, reset_done = threading.Event(), threading.Event()

    def first_then_reset(conn: RawConn) -> None:
        conn.read_head()
        conn.send(ok_response(b"first"))  # keep-alive: the proxy pools this connection
        release.wait(10)
        _reset(conn)
        reset_done.set()

    def answer_forever(conn: RawConn) -> None:
        while True:
            conn.read_head()
            conn.send(ok_response(b"second"))

    def handler(conn: RawConn) -> None:
        (first_then_reset if conn is up.conns[0] else answer_forever)(conn)

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port))
    with raw_client(proxy.address) as c:
        c.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(c)
        assert (status, body) == (200, b"first")
    release.set()
    assert reset_done.wait(10)
    with raw_client(proxy.address) as c:
        c.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(c)
    assert (status, body) == (200, b"second")
    assert len(up.conns) == 2, "the retry did not go to exactly one fresh connection"
    heads = [head for conn in up.conns for head in conn.heads]
    assert [h.split(b" ")[1] for h in heads] == [b"/one", b"/two"]  # /two seen exactly once


def test_504_then_client_connection_still_works(make_proxy, raw_upstream):
    """Rule 7: "upstream slower than `upstream_response` 504" - unlike 400 and 408 the contract
    does not say "then close", so the client's keep-alive connection (rule 6) carries on."""
    calls = []

    def handler(conn: RawConn) -> None:
        head = conn.read_head(timeout=WAIT)
        calls.append(head)
        if head.startswith(b"GET /slow "):
            conn.read_until_close(timeout=WAIT)
            return
        conn.send(ok_response(b"fast"))
        respond_ok_forever(conn)

    up = raw_upstream(handler)
    proxy = make_proxy(
        proxy_yaml(up.port, timeouts={"upstream_response": "300ms", "drain": 1})
    )
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, rest = read_response(sock)
        assert status == 504
        assert_short_error(body)
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(sock, rest)
        assert (status, body) == (200, b"fast")


@pytest.mark.parametrize("body_size", [10, 2 << 20], ids=["10-bytes", "2-MiB"])
def test_404_for_a_request_with_a_body(make_proxy, raw_upstream, body_size):
    """Rule 7: "no route 404" - a request with a body outside every route gets its 404 (the
    answer is readable even while the client is still sending, never lost to a reset), the
    body never reaches an upstream, and the connection either carries on or closes; nothing
    hangs."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, route={"path_prefix": "/api"}, timeouts=FAST_DRAIN))
    body = b"b" * body_size
    with raw_client(proxy.address) as sock:
        sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % body_size)

        def send_body() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(body)

        writer = threading.Thread(target=send_body, daemon=True)
        writer.start()
        status, headers, got, rest = read_response(sock)
        assert status == 404
        assert_short_error(got)
        writer.join(WAIT)
        if headers.get(b"connection", b"").lower() == b"close":
            _, closed = read_to_eof(sock, 5)
            assert closed
        else:
            sock.sendall(b"GET /api/next HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _, _ = read_response(sock, rest)
            assert status == 200
    assert b"bbbb" not in up.all_received()


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
