"""Rule 6, bodies: streamed both ways (Content-Length, chunked, close-delimited), `Expect:
100-continue`, bodiless responses (HEAD, 204, 304) and HTTP/1.0 clients."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import h11
import pytest

from tests.support.clients import raw_client, read_response, read_response_head, read_until_close
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.http_peers import chunked_echo, echo_path, h11_upstream
from tests.support.peers import RawConn
from tests.support.wire import ok_response, split_response

BIG = 8 * 1024 * 1024


def header(request: h11.Request, name: bytes) -> list[bytes]:
    return [v for n, v in request.headers if n == name]


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
