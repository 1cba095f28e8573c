"""Keep-alive and errors (rules 6 and 7): the client connection survives a 504, a 404 with a
body, a head split over many writes; stalled and slow bodies end as the contract says.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from tests.support.clients import http, raw_client, read_response, read_to_eof
from tests.support.configs import FAST_DRAIN, config_yaml, proxy_yaml, route
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.waiting import WAIT
from tests.support.wire import assert_short_error, ok_response

# --- rules 6 and 7: keep-alive and errors -------------------------------------------------------


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


def test_head_split_over_many_writes_succeeds(make_proxy, raw_upstream):
    """Rule 7's 408 is for a head not finished within `request_header`; a valid head sent one
    byte per write (TCP_NODELAY, ~100 writes) within that time is proxied normally. The proxy
    has read each byte before the next is sent: it parses the head in ~100 reads."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"request_header": 10, "drain": 1}))
    data = b"GET /slowly HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * 40 + b"\r\n\r\n"
    with raw_client(proxy.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            proxy.settle()
        status, _, body, _ = read_response(sock)
        assert (status, body) == (200, b"ok")
    assert up.accept().heads[0].startswith(b"GET /slowly HTTP/1.1\r\n")


def test_stalled_request_body_does_not_hang(make_proxy, raw_upstream):
    """A client promising 100 MiB (Content-Length) that stops after 1 MiB must not pin the
    proxy or the upstream forever. README: "a request body that stalls for `timeouts.idle` is a
    408"; rule 7: 408 "(then close)". The upstream connection is closed too, and it never saw
    a complete body."""
    got = [0]
    closed = threading.Event()

    def handler(conn: RawConn) -> None:
        conn.read_head(timeout=WAIT)
        got[0] = len(conn.received)
        conn.received.clear()
        conn.sock.settimeout(WAIT * 2)
        with contextlib.suppress(OSError):
            while data := conn.sock.recv(65536):
                got[0] += len(data)
        closed.set()

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"idle": "500ms", "drain": 1}))
    with raw_client(proxy.address, timeout=WAIT) as sock:
        sock.sendall(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (100 << 20))
        sock.sendall(b"z" * (1 << 20))
        status, _, body, _ = read_response(sock)
        assert status == 408
        assert_short_error(body)
        _, was_closed = read_to_eof(sock, 5)
        assert was_closed
    assert closed.wait(5), "the proxy left the upstream connection open"
    assert got[0] <= 1 << 20


def test_slow_upload_longer_than_upstream_response_is_not_a_504(make_proxy, raw_upstream):
    """Config: "upstream_response: 60  # upstream must start its response within this"; rule 6:
    "streamed bodies in both directions". An upload that lasts longer than `upstream_response`
    (but pauses well within `idle`), to an upstream that answers as soon as the body is
    complete, gets the upstream's answer: the upstream cannot be "slower than
    `upstream_response`" before it has the request it must respond to (nginx's
    proxy_read_timeout and Envoy's route timeout also start once the request is sent).

    How long the upload lasts is measured on the proxy's own clock: halfway through it, a
    request to an upstream that never answers gets its 504 (`upstream_response` has passed)."""

    def handler(conn: RawConn) -> None:
        conn.read_head(timeout=WAIT)
        body = conn.read_exactly(10, timeout=WAIT)
        conn.send(ok_response(b"got " + body))

    up, silent = raw_upstream(handler), raw_upstream(lambda conn: conn.read_until_close(WAIT))
    proxy = make_proxy(
        config_yaml({"up": up.port, "silent": silent.port},
                    [route("silent", path_prefix="/silent"), route("up")],
                    timeouts={"upstream_response": "600ms", "idle": 5, "drain": 1})
    )  # fmt: skip
    with raw_client(proxy.address, timeout=WAIT) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        assert http(proxy.address, "/silent")[0] == 504  # upstream_response since the upload began
        sock.sendall(b"56789")
        status, _, body, _ = read_response(sock)
    assert (status, body) == (200, b"got 0123456789")
