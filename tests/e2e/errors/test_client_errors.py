"""Rule 7, the client's errors: no route 404, malformed request 400 (then close), head too large
431, `request_header` passed 408, CONNECT 405; each a short response, and nothing of the
request reaches the upstream."""

from __future__ import annotations

import socket

import pytest

from tests.support.clients import (
    closed_by_peer,
    raw_client,
    read_response,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import recording_ok, respond_ok_forever
from tests.support.sentinels import first_upstream_request, is_sentinel, only_the_sentinel_arrives
from tests.support.wire import assert_short_error, decode_chunks

Response = tuple[int, dict[bytes, bytes], bytes, bytearray]


def error_exchange(sock: socket.socket, data: bytes) -> Response:
    sock.sendall(data)
    status, headers, body, rest = read_response(sock)
    assert_short_error(body)
    return status, headers, body, rest


def assert_400_then_close(address: tuple[str, int], data: bytes) -> None:
    with raw_client(address) as sock:
        status, headers, _, rest = error_exchange(sock, data)
        assert status == 400, (status, data)
        # "then close": the proxy says so or just does it; we require that it does it.
        assert closed_by_peer(sock, rest), f"connection stayed open after 400 for {data!r}"
        if b"connection" in headers:
            assert headers[b"connection"].lower() == b"close"


def test_404_unknown_host_keeps_connection_usable(make_proxy, raw_upstream):
    heads: list[bytes] = []
    up = raw_upstream(recording_ok(heads))
    proxy = make_proxy(proxy_yaml(up.port, route={"host": "a.example"}, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        status, _, _, rest = error_exchange(sock, b"GET /x HTTP/1.1\r\nHost: b.example\r\n\r\n")
        assert status == 404
        assert not rest
        # Keep-alive: the same socket carries a good request next.
        sock.sendall(b"GET /good HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, _, body, _ = read_response(sock)
        assert (status, body) == (200, b"ok")
    assert len(heads) == 1
    assert heads[0].startswith(b"GET /good ")
    assert b"b.example" not in b"".join(heads)


def test_404_path_prefix_miss_keeps_connection_usable(make_proxy, raw_upstream):
    heads: list[bytes] = []
    up = raw_upstream(recording_ok(heads))
    proxy = make_proxy(proxy_yaml(up.port, route={"path_prefix": "/api"}, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        status, _, _, rest = error_exchange(sock, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 404
        assert not rest
        sock.sendall(b"GET /api/v1 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(sock)
        assert (status, body) == (200, b"ok")
        status, _, _, _ = error_exchange(sock, b"GET /ap HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 404
    assert [h.split(b"\r\n")[0] for h in heads] == [b"GET /api/v1 HTTP/1.1"]


MALFORMED = {
    "content-length-and-transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-and-content-length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n"
    ),
    "two-differing-content-lengths": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "differing-content-length-list": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!"
    ),
    "content-length-abc": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "content-length-minus-1": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "content-length-plus-5": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "obs-fold-spaces": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  continued\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tcontinued\r\n\r\n",
    "whitespace-before-colon-host": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "whitespace-before-colon-other": b"GET / HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "garbage-request-line": b"GARBAGE\r\n\r\n",
    "unknown-http-version": b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n",
    "missing-target": b"GET HTTP/1.1\r\nHost: x\r\n\r\n",
    "empty-target": b"GET  HTTP/1.1\r\nHost: x\r\n\r\n",
    "http11-without-host": b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
    "two-host-headers": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_is_400_then_close(make_proxy, raw_upstream, data):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    assert_400_then_close(proxy.address, data)
    # Nothing of it reached the upstream: the proxy never even connected.
    only_the_sentinel_arrives(proxy.address, up)


def test_bad_chunk_size_in_one_send_stops_at_the_bad_chunk(make_proxy, raw_upstream):
    up = raw_upstream()  # records, never answers
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    assert_400_then_close(
        proxy.address,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nzz\r\nSMUGGLED\r\n0\r\n\r\n",
    )
    # The proxy may have checked the whole body first and sent nothing at all: then a
    # sentinel sent now is the first request the upstream sees.
    first, head = first_upstream_request(proxy.address, up)
    if is_sentinel(head):
        return
    body = first.read_until_close()
    assert head.startswith(b"POST /upload HTTP/1.1")
    payload, terminated = decode_chunks(body)
    assert b"hello".startswith(payload)
    assert not terminated, f"a terminating 0-chunk reached the upstream: {body!r}"
    assert b"SMUGGLED" not in body
    assert b"zz" not in body


def test_bad_chunk_size_after_streamed_chunk(make_proxy, raw_upstream):
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        conn = up.accept()
        head = conn.read_head()
        assert head.startswith(b"POST /upload HTTP/1.1")
        # The valid chunk is streamed on before the rest of the body exists.
        assert conn.read_exactly(10) == b"5\r\nhello\r\n"
        status, _, _, rest = error_exchange(sock, b"zz\r\nSMUGGLED\r\n0\r\n\r\n")
        assert status == 400
        assert closed_by_peer(sock, rest)
    # Nothing past the bad chunk: no bytes at all, and certainly no terminating 0-chunk.
    assert conn.read_until_close() == b""


SMALL_HEAD_LIMIT = {"max_request_header_bytes": 1024}


def test_431_head_too_large_sent_at_once(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, limits=SMALL_HEAD_LIMIT, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        # A complete head of ~4 KiB against a 1 KiB limit, in one write.
        data = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
        status, _, _, _ = error_exchange(sock, data)
        assert status == 431
    only_the_sentinel_arrives(proxy.address, up)


def test_431_head_too_large_still_incomplete(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, limits=SMALL_HEAD_LIMIT, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        # Past the limit and no end of head in sight: answered without waiting for the rest.
        # One write, so the proxy has read everything we sent when it answers (no RST race).
        filler = b"".join(b"X-Filler-%02d: %s\r\n" % (i, b"b" * 100) for i in range(40))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + filler)
        status, _, body, _ = read_response(sock)
        assert_short_error(body)
        assert status == 431
    only_the_sentinel_arrives(proxy.address, up)


def test_head_just_under_the_limit_is_fine(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, limits=SMALL_HEAD_LIMIT, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Small: " + b"a" * 500 + b"\r\n\r\n")
        status, _, body, _ = read_response(sock)
        assert (status, body) == (200, b"ok")


def test_408_partial_head_then_close(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"request_header": "300ms", "drain": 1}))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        status, headers, body, rest = read_response(sock)
        assert_short_error(body)
        assert status == 408
        assert closed_by_peer(sock, rest)
        if b"connection" in headers:
            assert headers[b"connection"].lower() == b"close"
    only_the_sentinel_arrives(proxy.address, up)


def test_408_partial_second_request_on_keep_alive(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        proxy_yaml(up.port, timeouts={"request_header": "300ms", "idle": 30, "drain": 1})
    )
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        # The second head starts but never finishes: request_header applies, not idle.
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        status, _, body, rest = read_response(sock)
        assert_short_error(body)
        assert status == 408
        assert closed_by_peer(sock, rest)


def test_idle_keep_alive_closed_quietly(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        proxy_yaml(up.port, timeouts={"idle": "300ms", "request_header": 30, "drain": 1})
    )
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, rest = read_response(sock)
        assert (status, body) == (200, b"ok")
        assert not rest
        sock.settimeout(5)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        assert data == b"", f"an idle close must be quiet, got {data!r}"


def test_405_connect(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        status, _, _, _ = error_exchange(
            sock, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
        )
        assert status == 405
    only_the_sentinel_arrives(proxy.address, up)


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
