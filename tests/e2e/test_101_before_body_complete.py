"""An upstream that switches before it has the whole request body gets no tunnel (rule 2).

README, Behaviour 2: "a 101 arriving before the request body was complete is a **502** and both
connections close"; RFC 9110 §7.8: a server switches only once it has the complete request.
"""

from __future__ import annotations

import threading

from tests.support.clients import raw_client, read_response, read_to_eof
from tests.support.configs import proxy_yaml
from tests.support.peers import RawConn

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
