"""Rule 6: plain HTTP through the proxy, over real sockets on loopback.

Keep-alive on both sides, pooled upstream connections, bodies streamed both ways,
`Expect: 100-continue`, bodiless responses (HEAD, 204, 304), HTTP/1.0 clients, pipelining.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable

import h11
import pytest

from tests.support.clients import raw_client, read_response, read_response_head
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.waiting import eventually
from tests.support.wire import ok_response

BIG = 8 * 1024 * 1024


# --- helpers ----------------------------------------------------------------------------


def h11_upstream(
    respond: Callable[[h11.Request, bytes], tuple[int, list[tuple[bytes, bytes]], bytes]],
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


def echo_path(request: h11.Request, body: bytes):
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


def header(request: h11.Request, name: bytes) -> list[bytes]:
    return [v for n, v in request.headers if n == name]


def read_until_close(sock: socket.socket, buf: bytes = b"", timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    data = bytearray(buf)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def split_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(b" ")[1]), headers, body


# --- keep-alive and pooling -------------------------------------------------------------


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


# --- streamed bodies --------------------------------------------------------------------


def _stream_big_body(proxy_address, chunked: bool) -> tuple[str, str, h11.Response]:
    """POST 8 MiB while reading the echo concurrently; (sent sha256, received sha256, head)."""
    payload = os.urandom(1024 * 1024)
    sent = hashlib.sha256()
    sock = raw_client(proxy_address, timeout=30)
    failure: list[BaseException] = []

    def send() -> None:
        try:
            framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % BIG
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
            for i in range(BIG // len(payload)):
                piece = payload[i:] + payload[:i]  # every MiB differs
                sent.update(piece)
                if chunked:
                    # Uneven chunk sizes, including tiny ones.
                    for part in (piece[:7], piece[7:65536], piece[65536:]):
                        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                else:
                    sock.sendall(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except BaseException as exc:
            failure.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    client = h11.Connection(h11.CLIENT)
    # Put the parser in the state of a client that sent a POST, so it reads the response.
    post = h11.Request(
        method="POST", target="/echo", headers=[("Host", "x"), ("Transfer-Encoding", "chunked")]
    )
    client.send(post)
    received = hashlib.sha256()
    response: h11.Response | None = None
    try:
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(262144))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                received.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
    finally:
        sender.join(30)
        sock.close()
    assert not failure, failure
    assert response is not None
    return sent.hexdigest(), received.hexdigest(), response


def test_post_8mib_content_length_streamed_both_ways(make_proxy, raw_upstream):
    requests: list[h11.Request] = []
    up = raw_upstream(chunked_echo(requests))
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    sent, received, response = _stream_big_body(proxy.address, chunked=False)
    assert response.status_code == 200
    assert sent == received
    assert header(requests[0], b"content-length") == [b"%d" % BIG]
    assert header(requests[0], b"transfer-encoding") == []


def test_post_8mib_chunked_streamed_both_ways(make_proxy, raw_upstream):
    requests: list[h11.Request] = []
    up = raw_upstream(chunked_echo(requests))
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    sent, received, response = _stream_big_body(proxy.address, chunked=True)
    assert response.status_code == 200
    assert sent == received
    assert header(requests[0], b"transfer-encoding") == [b"chunked"]
    assert header(requests[0], b"content-length") == []


def test_close_delimited_response_relayed_chunked(make_proxy, raw_upstream):
    body = os.urandom(200_000)

    def http10_upstream(conn: RawConn) -> None:
        conn.read_head()
        conn.send(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        conn.send(body)
        conn.close()

    up = raw_upstream(http10_upstream)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET /old HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, got, rest = read_response(sock)
        assert status == 200
        assert headers.get(b"transfer-encoding", b"").lower() == b"chunked"
        assert b"content-length" not in headers
        assert got == body
        assert not rest


# --- Expect: 100-continue ---------------------------------------------------------------


def test_expect_100_continue_relayed(make_proxy, raw_upstream):
    heads: list[bytes] = []

    def upstream(conn: RawConn) -> None:
        heads.append(conn.read_head())
        conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        got = conn.read_exactly(5)
        conn.send(ok_response(b"got " + got))
        conn.read_until_close(timeout=10)

    up = raw_upstream(upstream)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        head, rest = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 100 "), head
        assert not rest
        sock.sendall(b"hello")
        status, _, body, _ = read_response(sock)
        assert (status, body) == (200, b"got hello")
    assert b"expect: 100-continue" in heads[0].lower()


def _answers_without_100(status_line: bytes):
    def upstream(conn: RawConn) -> None:
        conn.read_head()
        conn.send(status_line + b"\r\nContent-Length: 6\r\n\r\nno way")
        conn.read_until_close(timeout=10)

    return upstream


def test_expect_100_continue_final_status_without_100(make_proxy, raw_upstream):
    for status_line, code in (
        (b"HTTP/1.1 417 Expectation Failed", 417),
        (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic", 401),
    ):
        up = raw_upstream(_answers_without_100(status_line))
        proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
        with raw_client(proxy.address) as sock:
            sock.sendall(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            # The body is never sent: the final status arrives first.
            status, headers, body, _ = read_response(sock)
            assert (status, body) == (code, b"no way")
            if code == 401:
                assert headers[b"www-authenticate"] == b"Basic"


# --- bodiless responses -----------------------------------------------------------------


def _bodiless_upstream(conn: RawConn) -> None:
    while True:
        head = conn.read_head(timeout=30)
        if head.startswith(b"HEAD "):
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Kind: head\r\n\r\n")
        elif head.startswith(b"GET /204 "):
            conn.send(b"HTTP/1.1 204 No Content\r\nX-Kind: 204\r\n\r\n")
        elif head.startswith(b"GET /304 "):
            conn.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n')
        else:
            conn.send(ok_response(b"after"))


def _next_is_ok(sock: socket.socket, rest: bytearray) -> None:
    """A following request on the same socket proves no stray body bytes were sent."""
    assert not rest, f"bytes after a bodiless response: {bytes(rest)!r}"
    sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body, rest = read_response(sock, rest)
    assert (status, body, bytes(rest)) == (200, b"after", b"")


def test_head_response_keeps_content_length_without_body(make_proxy, raw_upstream):
    up = raw_upstream(_bodiless_upstream)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"HEAD /file HTTP/1.1\r\nHost: x\r\n\r\n")
        head, rest = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\ncontent-length: 1234\r\n" in head.lower()
        assert b"transfer-encoding" not in head.lower()
        _next_is_ok(sock, rest)
    assert len(up.conns) == 1


def test_204_and_304(make_proxy, raw_upstream):
    up = raw_upstream(_bodiless_upstream)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, rest = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 204 ")
        assert b"x-kind: 204" in head.lower()
        assert b"transfer-encoding" not in head.lower()
        _next_is_ok(sock, rest)

        sock.sendall(b'GET /304 HTTP/1.1\r\nHost: x\r\nIf-None-Match: "v1"\r\n\r\n')
        head, rest = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 304 ")
        assert b'etag: "v1"' in head.lower()
        assert b"transfer-encoding" not in head.lower()
        _next_is_ok(sock, rest)
    assert len(up.conns) == 1


# --- HTTP/1.0 clients -------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n", b"GET /old HTTP/1.0\r\n\r\n"],
    ids=["with-host", "without-host"],  # Host is optional in HTTP/1.0
)
def test_http10_client_gets_response_and_close(make_proxy, raw_upstream, request_bytes):
    requests: list[tuple[h11.Request, bytes]] = []
    up = raw_upstream(h11_upstream(echo_path, requests))
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(request_bytes)
        data = read_until_close(sock)  # bounded: fails on timeout if it never closes
    assert data, "no response at all"
    status, headers, body = split_response(data)
    assert status == 200
    assert b"transfer-encoding" not in headers
    assert body == b"GET /old"
    assert headers.get(b"content-length", b"8") == b"8"
    assert len(requests) == 1


def test_http10_client_gets_unchunked_body_from_chunked_upstream(make_proxy, raw_upstream):
    def chunked_upstream(conn: RawConn) -> None:
        conn.read_head()
        conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        conn.read_until_close(timeout=10)

    up = raw_upstream(chunked_upstream)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n")
        data = read_until_close(sock)
    status, headers, body = split_response(data)
    assert status == 200
    assert b"transfer-encoding" not in headers  # an HTTP/1.0 client cannot read chunks
    assert body == b"hello world"


# --- pipelining -------------------------------------------------------------------------


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
