"""A request body cut off on either side ends that exchange cleanly (rules 6 and 7).

The body is pumped upstream by its own task; when the upstream resets mid-upload, or the client
goes away mid-upload, the exchange must end at once (a 502 or a close for the client, a close
for the upstream), nothing hangs, and the proxy goes on serving the next connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from tests.support.clients import raw_client, read_response, read_to_eof
from tests.support.configs import proxy_yaml
from tests.support.peers import RawConn
from tests.support.wire import ok_response

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
