"""A pooled upstream connection that died while idle costs the client nothing (rule 6).

README, Behaviour 6: "a request without a body that meets a dead pooled connection is retried
once, on a new connection". These upstreams reset the idle connection, so the proxy's *send*
of the next request fails (the other stale case, an EOF where the response was due, is in
tests/e2e/test_http.py).
"""

from __future__ import annotations

import socket
import struct
import threading

from tests.support.clients import raw_client, read_response
from tests.support.configs import proxy_yaml
from tests.support.peers import RawConn
from tests.support.wire import ok_response


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
