"""Rules 6 and 7, bodies that stall or are cut off: a stalled upload is a 408, a slow one is no
504, a client that stops reading is dropped, and an upload cut off on either side ends that
exchange cleanly while the next client is served."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from tests.support.clients import http, raw_client, read_response, read_to_eof
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.peers import RawConn
from tests.support.waiting import WAIT
from tests.support.wire import assert_short_error, ok_response


def test_client_that_stops_reading_is_dropped_after_idle(make_proxy, raw_upstream):
    """A client that stops reading a response is dropped after `timeouts.idle`.

    Otherwise one stalled reader would pin a connection to the upstream forever.
    """
    upstream_gave_up = threading.Event()

    def flood(conn: RawConn) -> None:
        conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        chunk = b"x" * 65536
        conn.sock.settimeout(60)  # read_head left a short timeout; only the proxy may end this
        try:
            for _ in range(1 << 14):  # bounded: at most 1 GiB
                conn.sock.sendall(chunk)
        except OSError:
            upstream_gave_up.set()

    up = raw_upstream(flood)
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"idle": "500ms", "drain": 1}))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(proxy.address)
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.recv(100)  # the response started; now stop reading
    assert upstream_gave_up.wait(15), "the proxy kept the stalled exchange open"
    sock.close()


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


BODY_SIZE = 4 << 20  # far more than the socket buffers hold, so the client is still uploading


PIECE = b"u" * 16384


def _upload(sock: socket.socket, size: int, stop: threading.Event) -> None:
    """Send a body of `size` bytes piece by piece until done, stopped, or the socket fails."""
    sent = 0
    with contextlib.suppress(OSError):
        while sent < size and not stop.is_set():
            sock.sendall(PIECE)
            sent += len(PIECE)


def _serve_next_connection(proxy) -> None:
    with raw_client(proxy.address) as c:
        c.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(c)
    assert (status, body) == (200, b"next")


def _upstream(first: Callable[[RawConn], None]) -> Callable[[RawConn], None]:
    """`first(conn)` handles the first connection; later ones answer 200 "next" forever."""
    seen: list[RawConn] = []

    def handler(conn: RawConn) -> None:
        seen.append(conn)
        if len(seen) == 1:
            first(conn)
            return
        while True:
            head = conn.read_head()
            assert b"Content-Length" not in head
            conn.send(ok_response(b"next"))

    return handler


def test_upstream_reset_mid_upload_is_502_or_close_and_the_next_client_is_served(
    make_proxy, raw_upstream
):
    def reset_after_some_body(conn: RawConn) -> None:
        conn.read_head()
        conn.read_exactly(len(PIECE))
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    up = raw_upstream(_upstream(reset_after_some_body))
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"drain": 1}))
    stop = threading.Event()
    with raw_client(proxy.address, timeout=10) as c:
        c.sendall(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BODY_SIZE)
        uploader = threading.Thread(target=_upload, args=(c, BODY_SIZE, stop), daemon=True)
        uploader.start()
        try:
            status, headers, body, _ = read_response(c)
        except (EOFError, ConnectionResetError):
            pass  # "or a close": the proxy may drop a client it can no longer answer
        else:
            assert status == 502, body
            assert headers.get(b"connection", b"").lower() == b"close"
            _, closed = read_to_eof(c)
            assert closed, "the client connection stayed open after the 502"
        finally:
            stop.set()
            uploader.join(10)
    assert not uploader.is_alive(), "the client's upload hung"
    _serve_next_connection(proxy)


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_client_gone_mid_upload_closes_the_upstream_and_the_next_client_is_served(
    make_proxy, raw_upstream, how
):
    closed_upstream = threading.Event()
    received: list[bytes] = []

    def read_until_close(conn: RawConn) -> None:
        conn.read_head()
        received.append(conn.read_until_close(timeout=10))
        closed_upstream.set()

    up = raw_upstream(_upstream(read_until_close))
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"drain": 1}))
    c = raw_client(proxy.address)
    c.sendall(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"u" * 300)
    up.accept()
    if how == "reset":
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    assert closed_upstream.wait(10), "the upstream connection stayed open"
    assert received[0] == b"u" * 300  # what the client sent, and never a complete body
    _serve_next_connection(proxy)
