"""Closing "did not happen" checks without a fixed wait.

Something that must not happen (bytes reaching an upstream, a connection opened) is checked
once a later sentinel has arrived: the sentinel is sent after the exchange under test, and
what it travels through keeps order (a TCP stream; a listener's accept queue), so anything
the proxy sent before it has arrived by the time the sentinel has. For an in-process proxy,
`ProxyThread.settle()` is the sentinel: the proxy has nothing left to do.
"""

from __future__ import annotations

import contextlib
import socket

from tests.support.clients import (
    Address,
    raw_client,
    read_response,
    read_response_head,
    read_to_eof,
)
from tests.support.peers import RawConn, RawUpstream
from tests.support.proxy_thread import ProxyThread

SENTINEL = b"/sentinel"


def sentinel_request(target: bytes = SENTINEL, host: bytes = b"app.example") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"


def next_connection_carries_sentinel(
    proxy: Address, up: RawUpstream, index: int, target: bytes = SENTINEL
) -> RawConn:
    """The `index`-th connection `up` accepts (0 = the first) carries a sentinel request sent
    now on a fresh client connection: the proxy opened no other connection before it.

    For an upstream without a handler (the test reads what arrives)."""
    with raw_client(proxy) as sock:
        sock.sendall(sentinel_request(target))
        conn = up.accept(index)
        head = conn.read_head()
    assert head.startswith(b"GET " + target + b" "), f"not the sentinel: {head!r}"
    assert len(up.conns) == index + 1, f"{len(up.conns)} upstream connections"
    return conn


def first_upstream_request(proxy: Address, up: RawUpstream) -> tuple[RawConn, bytes]:
    """The first connection `up` accepted and the first head it carried, once a sentinel sent
    now on a fresh client connection has reached `up` (for an upstream without a handler):
    when nothing went up before, that is the sentinel's."""
    with raw_client(proxy) as sock:
        sock.sendall(sentinel_request())
        first = up.accept(0)
        head = first.read_head()
    return first, head


def is_sentinel(head: bytes) -> bool:
    return head.startswith(b"GET " + SENTINEL + b" ")


def only_the_sentinel_arrives(
    proxy: Address, up: RawUpstream, host: bytes = b"x", prefix: bytes = b""
) -> None:
    """Nothing reached `up` before: a sentinel sent now (after `prefix`, e.g. a PROXY header;
    answered by `up`'s handler, which must read heads) is the only request it ever saw, on
    the only connection it accepted."""
    with raw_client(proxy) as sock:
        sock.sendall(prefix + sentinel_request(host=host))
        data, _ = read_to_eof(sock)
    assert data.startswith(b"HTTP/1.1 200 "), data
    heads = [head.split(b" ")[1] for conn in up.conns for head in conn.heads]
    assert heads == [SENTINEL], f"the upstream saw {heads}"
    assert len(up.conns) == 1


def next_request_follows(client: socket.socket, conn: RawConn) -> None:
    """Nothing followed the last exchange on `conn`: the client's next request (a sentinel on
    the same keep-alive connection, which the proxy sends on the same pooled upstream
    connection) is the very next thing `conn` receives."""
    client.sendall(b"GET " + SENTINEL + b" HTTP/1.1\r\nHost: app.example\r\n\r\n")
    head = conn.read_head()
    assert head.startswith(b"GET " + SENTINEL + b" HTTP/1.1\r\n"), f"before the sentinel: {head!r}"
    conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    answer, _ = read_response_head(client)
    assert answer.startswith(b"HTTP/1.1 204 "), answer


def nothing_more_upstream(proxy: ProxyThread, conn: RawConn) -> None:
    """Once the proxy has settled, `conn` has received nothing beyond what was read."""
    proxy.settle()
    assert conn.nothing_pending(), f"the upstream received more: {bytes(conn.received)!r}"


def client_answered_by_the_proxy(sock: socket.socket, already: bytes | bytearray = b"") -> bytes:
    """Send the client's sentinel, a request the proxy answers itself (a 400, then close),
    and return what the client got before that answer (or before the proxy closed)."""
    with contextlib.suppress(OSError):
        sock.sendall(b"GARBAGE\r\n\r\n")
    data, _ = read_to_eof(sock)
    data = bytes(already) + data
    before, found, _ = data.partition(b"HTTP/1.1 400 ")
    return before if found else data


def assert_502_and_no_tunnel(client: socket.socket, conn: RawConn, leaked: bytes) -> None:
    """The client gets a 502 and never `leaked`; its next bytes (a request the proxy answers
    itself) are no tunnel data; the failed upstream connection `conn` is closed with nothing
    more sent, never spliced and never reused."""
    status, headers, _, buf = read_response(client)
    assert status == 502
    assert b"upgrade" not in headers
    assert leaked not in client_answered_by_the_proxy(client, buf)
    assert conn.read_until_close() == b""
