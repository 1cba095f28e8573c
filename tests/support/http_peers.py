"""HTTP upstreams parsed by h11, run by a raw-socket upstream (`raw_upstream(handler)`): they
answer what a test says, keep-alive, and record each request they read."""

from __future__ import annotations

from collections.abc import Callable

import h11

from tests.support.peers import RawConn

Respond = Callable[[h11.Request, bytes], tuple[int, list[tuple[bytes, bytes]], bytes]]


def h11_upstream(
    respond: Respond,
    requests: list[tuple[h11.Request, bytes]],
) -> Callable[[RawConn], None]:
    """A keep-alive upstream parsed by h11: `respond(request, body)` -> (status, headers, body)."""

    def handler(conn: RawConn) -> None:
        h = h11.Connection(h11.SERVER)
        conn.sock.settimeout(30)
        request: h11.Request | None = None
        body = b""
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(conn.sock.recv(65536))
            elif isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                requests.append((request, body))
                status, headers, out = respond(request, body)
                data = h.send(h11.Response(status_code=status, headers=headers))
                if out:
                    data += h.send(h11.Data(data=out))
                conn.send(data + h.send(h11.EndOfMessage()))
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    conn.close()
                    return
                h.start_next_cycle()
            else:
                return

    return handler


def echo_path(request: h11.Request, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Answers with the method and the target (and the body, if any)."""
    out = request.method + b" " + request.target + (b" " + body if body else b"")
    return 200, [(b"Content-Length", b"%d" % len(out))], out


def chunked_echo(requests: list[h11.Request]) -> Callable[[RawConn], None]:
    """Streams each request body straight back as a chunked response, chunk by chunk."""

    def handler(conn: RawConn) -> None:
        h = h11.Connection(h11.SERVER)
        conn.sock.settimeout(30)
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(conn.sock.recv(65536))
            elif isinstance(event, h11.Request):
                requests.append(event)
                head = h11.Response(status_code=200, headers=[(b"Transfer-Encoding", b"chunked")])
                conn.send(h.send(head))
            elif isinstance(event, h11.Data):
                conn.send(h.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                conn.send(h.send(h11.EndOfMessage()))
                h.start_next_cycle()
            else:
                return

    return handler
