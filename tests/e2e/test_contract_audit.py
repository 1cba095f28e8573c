"""An adversarial audit of the contract's "Proxy behaviour" rules 1-8, sentence by sentence.

Covers what the other e2e files leave open: more smuggling shapes, pipelining around a bad
request, upgrade edge cases (split headers, interim responses, odd 101s, early FINs), tunnel
resets and ordering under load, forwarding lists, keep-alive after errors, stalled and slow
bodies, and the balancer's weights, in-flight counting and connect timeouts.

Every test uses raw blocking sockets on 127.0.0.1, every wait is bounded, and nothing asserts
how long something took beyond "eventually, within N seconds". Each docstring quotes the
contract sentence (/work/shared/interface.md), the README choice or the RFC section it checks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import (
    QUIET,
    RawConn,
    eventually,
    free_port,
    ok_response,
    proxy_yaml,
    quiet_read,
    raw_client,
    read_response,
    read_response_head,
    recv_exactly,
    respond_ok_forever,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SWITCH_WS = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n"
)
FAST_DRAIN = "timeouts: {drain: 1}"
WAIT = 10


# --- helpers ------------------------------------------------------------------------------


def ws_request(
    *extra: bytes,
    target: bytes = b"/chat",
    connection: bytes = b"Upgrade",
    upgrade: bytes = b"websocket",
) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: app.example"]
    if connection:
        lines.append(b"Connection: " + connection)
    if upgrade is not None:
        lines.append(b"Upgrade: " + upgrade)
    lines += [b"Sec-WebSocket-Key: " + KEY, b"Sec-WebSocket-Version: 13", *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def fields(head: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in head.rstrip(b"\r\n").split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out.append((name.strip().lower(), value.strip()))
    return out


def values(head: bytes, name: bytes) -> list[bytes]:
    return [v for n, v in fields(head) if n == name]


def elements(head: bytes, name: bytes) -> list[bytes]:
    return [e.strip() for v in values(head, name) for e in v.split(b",") if e.strip()]


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def read_to_eof(sock: socket.socket, timeout: float = 5) -> tuple[bytes, bool]:
    """(bytes, closed): everything until EOF/RST, or what came before `timeout` passed."""
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(out), True
        except TimeoutError:
            return bytes(out), False
        if not data:
            return bytes(out), True
        out += data


def assert_short_error(body: bytes) -> None:
    """Rule 7: "each a short response ... never a traceback to the client"."""
    assert len(body) < 256, body
    assert b"Traceback" not in body, body
    assert b'File "' not in body, body


def error_then_close(address: tuple[str, int], data: bytes) -> tuple[int, dict[bytes, bytes]]:
    """Send `data`, read one response, require that the proxy then closes; (status, headers)."""
    with raw_client(address) as sock:
        sock.sendall(data)
        status, headers, body, rest = read_response(sock)
        assert_short_error(body)
        more, closed = read_to_eof(sock, 5)
        assert not rest, bytes(rest)
        assert more == b"", more
        assert closed, f"connection stayed open after {status} for {data!r}"
    return status, headers


def no_upstream_connection(up, wait: float = QUIET) -> None:
    time.sleep(wait)
    assert up.conns == [], "something of a malformed request reached the upstream"


def raw_tunnel(address: tuple[str, int], target: bytes = b"/t") -> tuple[socket.socket, bytes]:
    """Client side of a WebSocket handshake through the proxy: (socket, bytes behind the 101)."""
    key = base64.b64encode(os.urandom(16))
    sock = raw_client(address, timeout=WAIT)
    sock.sendall(
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head, rest = read_response_head(sock)
    assert status_of(head) == 101, head
    return sock, bytes(rest)


def accept_101(conn: RawConn) -> bytes:
    """Upstream side: read the upgrade head, answer a correct 101; returns the head."""
    head = conn.read_head(timeout=WAIT)
    key = values(head, b"sec-websocket-key")[0]
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    conn.sock.settimeout(WAIT)
    return head


def rst(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- rule 7: malformed requests ------------------------------------------------------------

MALFORMED = {
    # Content-Length shapes not covered by test_errors.py
    "cl-hex": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello",
    "cl-decimal-point": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5.0\r\n\r\nhello",
    "cl-inner-space": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2\r\n\r\nhello",
    "cl-empty": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\nhello",
    "cl-over-2^64": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551621\r\n\r\nhello"
    ),
    "te-chunked-and-cl-odd-case": (
        b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: ChUnKeD\r\nCONTENT-LENGTH: 3\r\n\r\n"
        b"0\r\n\r\n"
    ),
    "te-tab-chunked-and-cl": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding:\tchunked\r\n\r\n"
        b"0\r\n\r\n"
    ),
    "te-space-before-colon": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
    ),
    # field syntax
    "space-in-field-name": b"GET / HTTP/1.1\r\nHost: x\r\nX Bad: 1\r\n\r\n",
    "empty-field-name": b"GET / HTTP/1.1\r\nHost: x\r\n: value\r\n\r\n",
    "line-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
    "non-ascii-field-name": b"GET / HTTP/1.1\r\nHost: x\r\nX-Caf\xe9: 1\r\n\r\n",
    "whitespace-before-first-field": b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
    "nul-in-field-name": b"GET / HTTP/1.1\r\nHost: x\r\nX-\x00A: 1\r\n\r\n",
    "lf-in-value-via-bare-lf": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n",
    # request line
    "tab-in-request-line": b"GET\t/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "two-spaces-after-target": b"GET /  HTTP/1.1\r\nHost: x\r\n\r\n",
    "trailing-space-request-line": b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
    "lowercase-http-version": b"GET / http/1.1\r\nHost: x\r\n\r\n",
    "space-inside-target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "leading-space-request-line": b" GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-method-char": b"G(ET / HTTP/1.1\r\nHost: x\r\n\r\n",
    # Host (RFC 9112 §3.2: a Host with an invalid field value is a 400)
    "host-with-userinfo": b"GET / HTTP/1.1\r\nHost: user@app.example\r\n\r\n",
    "host-bad-port": b"GET / HTTP/1.1\r\nHost: app.example:abc\r\n\r\n",
    "host-with-space": b"GET / HTTP/1.1\r\nHost: app example\r\n\r\n",
    "host-unclosed-ipv6": b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
    "absolute-form-with-userinfo": (
        b"GET http://user:pw@app.example/ HTTP/1.1\r\nHost: app.example\r\n\r\n"
    ),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_more_malformed_requests_are_400_then_close(make_proxy, raw_upstream, data):
    """Rule 7: "malformed request 400 (then close)". "Malformed includes, per RFC 9112 ...:
    several differing `Content-Length`s, an invalid `Content-Length` ..., whitespace before a
    colon, NUL/CR/LF inside a field value, a bad request line". "Nothing of a malformed request
    reaches an upstream." (RFC 9112 §2.2, §3, §3.2, §5, §6.3; RFC 9110 §4.2.4 userinfo.)"""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    status, headers = error_then_close(proxy.address, data)
    assert status == 400, (status, data)
    if b"connection" in headers:
        assert headers[b"connection"].lower() == b"close"
    no_upstream_connection(up)


TRANSFER_CODINGS = {
    "chunked-twice-in-one-field": b"chunked, chunked",
    "gzip-then-chunked": b"gzip, chunked",
    "identity": b"identity",
    "chunked-with-parameter": b"chunked;q=1",
    "two-te-fields": b"chunked\r\nTransfer-Encoding: chunked",
    "chunked-then-gzip": b"chunked, gzip",
}


@pytest.mark.parametrize("coding", list(TRANSFER_CODINGS.values()), ids=list(TRANSFER_CODINGS))
def test_unsupported_transfer_coding_is_rejected_then_close(make_proxy, raw_upstream, coding):
    """Rule 7 ("malformed request 400 (then close)", "to shut the door on request smuggling")
    and RFC 9112 §6.1 (a transfer coding the server does not understand is a 501; chunked
    twice is invalid). README: "an unknown transfer coding **501**". Either way: an error,
    then close, and nothing reaches the upstream."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    data = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    status, _ = error_then_close(proxy.address, data)
    assert status in (400, 501), status
    no_upstream_connection(up)


def test_http10_request_with_transfer_encoding_is_400(make_proxy, raw_upstream):
    """RFC 9112 §6.1: "A server or client that receives an HTTP/1.0 message containing a
    Transfer-Encoding header field MUST treat the message as if the framing is faulty, even if
    a Content-Length is present, and close the connection after processing the message."
    Rule 7: malformed "per RFC 9112 and to shut the door on request smuggling" is a 400 (then
    close), and "Nothing of a malformed request reaches an upstream"."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    data = (
        b"POST /old HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    status, _ = error_then_close(proxy.address, data)
    assert status == 400
    no_upstream_connection(up)


BAD_CHUNKS = {
    # h11 < 0.16 skipped the two bytes after chunk data unchecked (CVE-2025-43859).
    "chunk-data-longer-than-size": b"5\r\nhelloXX\r\nSMUGGLED\r\n0\r\n\r\n",
    "negative-chunk-size": b"-5\r\nhello\r\nSMUGGLED\r\n0\r\n\r\n",
    "leading-space-chunk-size": b" 5\r\nhello\r\nSMUGGLED\r\n0\r\n\r\n",
    "0x-prefixed-chunk-size": b"0x5\r\nhello\r\nSMUGGLED\r\n0\r\n\r\n",
    "chunk-size-overflow": b"fffffffffffffffffffffff\r\nSMUGGLED\r\n0\r\n\r\n",
    # a chunk-size line that never ends is still a bad chunk size, not a too-large head
    "20k-garbage-chunk-line": b"z" * 20000,
}


@pytest.mark.parametrize("body", list(BAD_CHUNKS.values()), ids=list(BAD_CHUNKS))
def test_bad_chunk_is_400_and_nothing_past_it_reaches_upstream(make_proxy, raw_upstream, body):
    """Rule 7: "an invalid ... chunk size" is malformed (400, then close); "Nothing of a
    malformed request reaches an upstream (for a bad chunk in a streamed body: nothing past the
    bad chunk)"."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    status, _ = error_then_close(
        proxy.address,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert status == 400
    try:
        conn = up.accept(timeout=1)
    except TimeoutError:
        return  # nothing at all reached the upstream
    received = conn.read_until_close(timeout=5)
    _, _, sent_body = received.partition(b"\r\n\r\n")
    assert b"SMUGGLED" not in received
    assert b"XX" not in sent_body
    assert not sent_body.endswith(b"0\r\n\r\n"), f"a terminating chunk went up: {sent_body!r}"


def test_bare_lf_chunk_lines_are_answered_promptly(make_proxy, raw_upstream):
    """Rule 7: "an invalid ... chunk size" is a 400. RFC 9112 §7.1: `chunk = chunk-size
    [ chunk-ext ] CRLF chunk-data CRLF` (§2.2's bare-LF leniency covers the start line and
    fields only). A chunk-size line ended by a bare LF is a bad chunk: it is answered 400, and
    the client is not left waiting for `timeouts.idle` (here 30 s) for an answer."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra="timeouts: {idle: 30, drain: 1}"))
    with raw_client(proxy.address, timeout=5) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"
        )
        try:
            status, _, body, _ = read_response(sock)
        except TimeoutError:
            pytest.fail("no answer within 5 s to a body whose chunk lines end in bare LF")
    assert_short_error(body)
    assert status == 400


# --- the raw-head checks h11 cannot make (obs-fold, head size) ---------------------------------


def test_obs_fold_in_a_head_ending_lf_crlf_is_400(make_proxy, raw_upstream):
    """Rule 7: "obs-fold (a header line starting with whitespace)" is malformed: 400, then
    close, nothing upstream - whatever line endings the head uses. RFC 9112 §2.2 lets a
    recipient accept a bare LF as a line terminator (h11 does, and ends a head at LF CRLF);
    the obs-fold check must see the same head h11 parses."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    status, _ = error_then_close(proxy.address, b"GET / HTTP/1.1\nHost: x\nX-A: 1\n folded\n\r\n")
    assert status == 400
    no_upstream_connection(up)


def test_431_for_a_whole_head_ending_lf_crlf(make_proxy, raw_upstream):
    """Rule 7: "head too large 431" (`limits.max_request_header_bytes`), also for a head that
    arrives whole in one write and ends with LF CRLF (RFC 9112 §2.2 bare-LF leniency)."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        proxy_yaml(up.port, extra="limits: {max_request_header_bytes: 1024}\n" + FAST_DRAIN)
    )
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\nHost: x\nX-Big: " + b"a" * 4000 + b"\n\r\n")
        status, _, body, _ = read_response(sock)
    assert_short_error(body)
    assert status == 431
    no_upstream_connection(up)


def test_bare_lf_head_with_crlfs_in_its_body(make_proxy, raw_upstream):
    """The proxy accepts bare-LF heads (RFC 9112 §2.2, see the test above); the body that
    follows is content, not header lines: a CRLF CRLF or a line starting with a space inside
    the body must not turn a valid request into a 400 (obs-fold) or a 431."""
    store: list[tuple[bytes, bytes]] = []
    up = _recording_upstream(raw_upstream, store)
    proxy = make_proxy(
        proxy_yaml(up.port, extra="limits: {max_request_header_bytes: 1024}\n" + FAST_DRAIN)
    )
    body = b"x" * 2000 + b"\r\n indented line\r\n\r\n"
    with raw_client(proxy.address) as sock:
        sock.sendall(b"POST /lf HTTP/1.1\nHost: x\nContent-Length: %d\n\n" % len(body) + body)
        status, _, got, _ = read_response(sock)
        assert (status, got) == (200, b"ok")
    assert store[0][1] == body


# --- valid but unusual framing must still work -----------------------------------------------


def _recording_upstream(raw_upstream, store: list[tuple[bytes, bytes]]):
    """An upstream that reads one request (CL or chunked body) and answers 200 `ok`."""

    def handler(conn: RawConn) -> None:
        while True:
            head = conn.read_head(timeout=WAIT)
            te = [v.lower() for v in values(head, b"transfer-encoding")]
            cl = values(head, b"content-length")
            body = b""
            if te:
                assert te == [b"chunked"], head
                while True:
                    while b"\r\n" not in conn.received:
                        conn.received += conn.sock.recv(65536)
                    line, _, _ = bytes(conn.received).partition(b"\r\n")
                    conn.read_exactly(len(line) + 2)
                    size = int(line, 16)  # the proxy re-frames: no extensions, no spaces
                    if size == 0:
                        assert conn.read_exactly(2) == b"\r\n"
                        break
                    body += conn.read_exactly(size)
                    assert conn.read_exactly(2) == b"\r\n"
            elif cl:
                assert len(cl) == 1, head
                assert cl[0].isdigit(), head
                body = conn.read_exactly(int(cl[0]))
            store.append((head, body))
            conn.send(ok_response())

    return raw_upstream(handler)


VALID_ODD = {
    "te-odd-case": (b"Transfer-Encoding: ChUnKeD", b"5\r\nhello\r\n0\r\n\r\n"),
    "te-tabs-around-value": (b"Transfer-Encoding:\t chunked \t", b"5\r\nhello\r\n0\r\n\r\n"),
    "chunk-ext-quoted-semicolon": (
        b"Transfer-Encoding: chunked",
        b'5;a="x;y";b\r\nhello\r\n0\r\n\r\n',
    ),
    "chunk-with-trailer-field": (
        b"Transfer-Encoding: chunked",
        b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    ),
    "cl-leading-zeros": (b"Content-Length: 0005", b"hello"),
    "cl-identical-list": (b"Content-Length: 5, 5", b"hello"),
    "cl-identical-repeated": (b"Content-Length: 5\r\nContent-Length: 5", b"hello"),
    "cl-named-in-connection": (b"Content-Length: 5\r\nConnection: Content-Length", b"hello"),
    "te-named-in-connection": (
        b"Transfer-Encoding: chunked\r\nConnection: transfer-encoding",
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
}


@pytest.mark.parametrize(("framing", "body"), list(VALID_ODD.values()), ids=list(VALID_ODD))
def test_valid_but_unusual_framing_is_reframed_cleanly(make_proxy, raw_upstream, framing, body):
    """Rule 3: the proxy "frames bodies itself (Content-Length or chunked)", whatever the
    client's `Connection` names. Valid framings (case-insensitive codings, OWS, chunk
    extensions, trailers, RFC 9110 §8.6's identical Content-Length list) reach the upstream
    as one clean framing of exactly the body; trailers are dropped (README rule 3)."""
    store: list[tuple[bytes, bytes]] = []
    up = _recording_upstream(raw_upstream, store)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n" + body)
        status, _, got, _ = read_response(sock)
        assert (status, got) == (200, b"ok")
        # keep-alive survives the odd framing: the body was consumed exactly
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    (head, sent), _ = store
    assert sent == b"hello"
    assert b"x-trailer" not in [n for n, _ in fields(head)]
    assert len(values(head, b"content-length") + values(head, b"transfer-encoding")) == 1, head


def test_bare_lf_head_is_accepted_or_rejected_never_hangs(make_proxy, raw_upstream):
    """RFC 9112 §2.2: "a recipient MAY recognize a single LF as a line terminator". Either
    answer is allowed; what reaches the upstream is a clean CRLF head, and a 400 closes."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET /lf HTTP/1.1\nHost: x\nX-A: 1\n\n")
        status, _, body, _ = read_response(sock)
    assert status in (200, 400), status
    if status == 200:
        head = up.accept().heads[0]
        assert b"\n" not in head.replace(b"\r\n", b""), head
        assert values(head, b"x-a") == [b"1"]
    else:
        assert_short_error(body)


def test_obs_text_value_passes_unchanged(make_proxy, raw_upstream):
    """Rule 1: end-to-end headers go upstream "unchanged"; RFC 9110 §5.5 allows obs-text
    (bytes 0x80-0xFF) in field values."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9 \xff\xfe\r\n\r\n")
        assert read_response(sock)[0] == 200
    assert values(up.accept().heads[0], b"x-name") == [b"caf\xe9 \xff\xfe"]


# --- absolute-form and Host -----------------------------------------------------------------


def test_absolute_form_authority_replaces_a_different_host(make_proxy, raw_upstream):
    """RFC 9112 §3.2.2: "When a proxy receives a request with an absolute-form of
    request-target, the proxy MUST ignore the received Host header field (if any) and instead
    replace it with the host information of the request-target." README: absolute-form
    targets "are routed by their authority and sent upstream in origin form". The upstream
    must never see a Host other than the one the request was routed by (else a route limited
    to `public.example` forwards requests for any virtual host behind it)."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, route='host: "public.example"', extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET http://public.example/x?q=1 HTTP/1.1\r\nHost: internal.example\r\n\r\n")
        status, _, body, _ = read_response(sock)
    if status == 400:  # rejecting the mismatch outright is also safe
        assert_short_error(body)
        no_upstream_connection(up)
        return
    assert status == 200
    head = up.accept().heads[0]
    assert head.startswith(b"GET /x?q=1 HTTP/1.1\r\n"), head
    assert values(head, b"host") == [b"public.example"], head
    assert b"internal.example" not in head, head


def test_absolute_form_without_host_header_is_400(make_proxy, raw_upstream):
    """Rule 7: "an HTTP/1.1 request without `Host`" is malformed, absolute-form or not
    (RFC 9112 §3.2: "A server MUST respond with a 400 ... to any HTTP/1.1 request message
    that lacks a Host header field")."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    status, _ = error_then_close(
        proxy.address, b"GET http://app.example/ HTTP/1.1\r\nX-A: 1\r\n\r\n"
    )
    assert status == 400
    no_upstream_connection(up)


# --- pipelining ----------------------------------------------------------------------------


def test_pipelined_malformed_request_in_the_middle(make_proxy, raw_upstream):
    """Rule 7: "malformed request 400 (then close)" and "Nothing of a malformed request reaches
    an upstream": with three requests in one packet, the first is answered, the bad second gets
    a 400, the connection closes, and the third never reaches the upstream."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
            b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        status, _, body, rest = read_response(sock)
        assert (status, body) == (200, b"ok")
        status, _, body, rest = read_response(sock, rest)
        assert status == 400
        assert_short_error(body)
        more, closed = read_to_eof(sock, 5)
        assert not rest
        assert more == b""
        assert closed
    time.sleep(QUIET)
    heads = [h for c in up.conns for h in c.heads]
    assert [h.split(b" ")[1] for h in heads] == [b"/one"]
    assert b"/three" not in up.all_received()


def test_nothing_after_connection_close_reaches_upstream(make_proxy, raw_upstream):
    """Rule 6 keep-alive, RFC 9112 §9.6: a server that receives "close" "MUST NOT process any
    further requests received on that connection": the pipelined second request is ignored."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        status, _, _, rest = read_response(sock)
        assert status == 200
        more, closed = read_to_eof(sock, 5)
        assert closed
        assert not rest
        assert more == b""
    time.sleep(QUIET)
    assert [h.split(b" ")[1] for c in up.conns for h in c.heads] == [b"/a"]


# --- rule 1 and 2: upgrade variants ----------------------------------------------------------


def test_offer_split_over_repeated_connection_and_upgrade_fields(make_proxy, raw_upstream):
    """Rule 1: "A request whose `Connection` header lists `upgrade` and whose `Upgrade` header
    offers protocols goes upstream with `Connection: upgrade` and an `Upgrade` header holding
    only the protocols the route allows, in the client's order"; tokens "match
    case-insensitively". RFC 9110 §5.3: repeated fields are one comma list; empty list
    elements are ignored (§5.6.1)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            ws_request(
                b"Upgrade: ,,WebSocket,,",
                b"Connection: UPGRADE",
                connection=b"keep-alive",
                upgrade=b"foo/1",
            )
        )
        conn = up.accept()
        head = conn.read_head()
        assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
        assert elements(head, b"upgrade") == [b"WebSocket"], head
        conn.send(SWITCH_WS)
        resp, buf = read_response_head(sock)
        assert status_of(resp) == 101
        sock.sendall(b"up!")
        assert conn.read_exactly(3) == b"up!"
        conn.send(b"down!")
        assert recv_exactly(sock, 5, buf) == b"down!"


def test_upgrade_with_connection_close_still_switches(make_proxy, raw_upstream):
    """Rule 1: a request "whose `Connection` header lists `upgrade`" is an offer, whatever
    else it lists; rule 2: on a valid 101 the proxy relays it "and then splice[s] raw bytes
    both ways" (`close` only concerns the HTTP connection that the 101 ends)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(connection=b"close, Upgrade"))
        conn = up.accept()
        head = conn.read_head()
        assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
        conn.send(SWITCH_WS)
        resp, buf = read_response_head(sock)
        assert status_of(resp) == 101, resp
        sock.sendall(b"up")
        assert conn.read_exactly(2) == b"up"
        conn.send(b"down")
        assert recv_exactly(sock, 4, buf) == b"down"


def test_empty_upgrade_value_is_no_offer(make_proxy, raw_upstream):
    """Rule 1: only an `Upgrade` header that "offers protocols" is an offer; rule 2: "a 101 to
    a request that offered none ... is a 502"."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(upgrade=b""))
        conn = up.accept()
        head = conn.read_head()
        assert b"upgrade" not in [n for n, _ in fields(head)], head
        assert b"upgrade" not in [t.lower() for t in elements(head, b"connection")], head
        conn.send(SWITCH_WS + b"TUNNEL")
        status, _, _, buf = read_response(sock)
        assert status == 502
        rest, _ = quiet_read(sock)
        assert b"TUNNEL" not in bytes(buf) + rest


def test_interim_responses_before_the_101(make_proxy, raw_upstream):
    """Rule 2: "Only when the upstream answers `101 Switching Protocols` ... does the proxy
    relay that 101 ... and then splice raw bytes both ways"; RFC 9110 §15.2: a 1xx is interim,
    so a `100` or `103 Early Hints` before the 101 does not end the exchange. README: other 1xx
    are relayed to HTTP/1.1 clients."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            + SWITCH_WS
            + b"first"
        )
        seen = []
        buf = bytearray()
        while True:
            head, buf = read_response_head(sock, buf)
            seen.append(status_of(head))
            if status_of(head) not in (100, 103):
                break
        assert seen[-1] == 101, seen
        assert values(head, b"sec-websocket-accept") == [ACCEPT]
        assert recv_exactly(sock, 5, buf) == b"first"
        sock.sendall(b"client")
        assert conn.read_exactly(6) == b"client"


def test_101_naming_two_offered_protocols_is_relayed(make_proxy, raw_upstream):
    """Rule 2: the proxy relays a 101 "with an `Upgrade` naming one of the protocols sent ...
    (with its `Upgrade`/`Connection` and end-to-end headers)"; RFC 9110 §7.8 lets a server
    switch to a stack of the offered protocols."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route='upgrade: ["foo", "bar"]', extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo/2, bar\r\n\r\n"
        )
        conn = up.accept()
        assert elements(conn.read_head(), b"upgrade") == [b"foo/2", b"bar"]
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
            b"Upgrade: BAR, foo/2\r\nX-E2E: kept\r\n\r\n"
        )
        head, _ = read_response_head(sock)
        assert status_of(head) == 101
        assert [t.lower() for t in elements(head, b"upgrade")] == [b"bar", b"foo/2"]
        assert values(head, b"x-e2e") == [b"kept"]
        sock.sendall(b"ping")
        assert conn.read_exactly(4) == b"ping"


def test_101_naming_an_offered_and_an_unoffered_protocol_is_502(make_proxy, raw_upstream):
    """Rule 2: "A 101 naming a protocol that was not offered ... is a 502." (even when it also
    names one that was)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route='upgrade: ["foo", "bar"]', extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo/2, bar\r\n\r\n"
        )
        conn = up.accept()
        conn.read_head()
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
            b"Upgrade: foo/2, h2c\r\n\r\nTUNNEL"
        )
        status, _, body, buf = read_response(sock)
        assert status == 502
        assert_short_error(body)
        rest, _ = quiet_read(sock)
        assert b"TUNNEL" not in bytes(buf) + rest
        with contextlib.suppress(OSError):
            sock.sendall(b"client-bytes")
        assert conn.read_until_close(timeout=5) == b""


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 5\r\n", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"],
    ids=["content-length", "content-length-and-chunked"],
)
def test_101_with_framing_and_close_headers_is_relayed_clean(make_proxy, raw_upstream, framing):
    """Rule 2: the proxy relays the 101 "with its `Upgrade`/`Connection`" and "bytes behind the
    upstream's 101 head reach the client first thing after it"; rule 3: `Connection`,
    `Keep-Alive` and `Transfer-Encoding` are removed and the proxy "frames bodies itself".
    A 101 has no body, and RFC 9110 §8.6: "A server MUST NOT send a Content-Length header
    field in any response with a status code of 1xx". So the client gets a 101 with
    `Connection: upgrade`, no framing header, and the bytes behind it as tunnel bytes."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: close, Upgrade\r\nKeep-Alive: timeout=5\r\n"
            + framing
            + b"Sec-WebSocket-Accept: "
            + ACCEPT
            + b"\r\n\r\nabcde-tunnel"
        )
        head, buf = read_response_head(sock)
        assert status_of(head) == 101, head
        assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
        present = [n for n, _ in fields(head)]
        assert b"keep-alive" not in present, head
        assert b"transfer-encoding" not in present, head
        assert b"content-length" not in present, head
        assert recv_exactly(sock, 12, buf) == b"abcde-tunnel"
        sock.sendall(b"up")
        assert conn.read_exactly(2) == b"up"


def test_101_then_bytes_then_fin_in_one_go(make_proxy, raw_upstream):
    """Rule 2: "bytes behind the upstream's 101 head reach the client first thing after it";
    rule 5: "Half-closes are propagated (a FIN one way does not cut the other way)" - even when
    the upstream's FIN arrives together with its 101."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(SWITCH_WS + b"server-done")
        conn.sock.shutdown(socket.SHUT_WR)
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        data, closed = read_to_eof(sock, 5)
        assert bytes(buf) + data == b"server-done"
        assert closed
        sock.sendall(b"client-after-fin")
        assert conn.read_exactly(16) == b"client-after-fin"
        sock.shutdown(socket.SHUT_WR)
        assert conn.read_until_close(timeout=5) == b""
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0)


def test_101_then_immediate_close(make_proxy, raw_upstream):
    """Rule 5: when the upstream is gone right after its 101, the client gets the 101 then EOF,
    and the tunnel is finished (`upgradeproxy_tunnels_active` back to 0)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(SWITCH_WS)
        conn.close()
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        data, closed = read_to_eof(sock, 5)
        assert bytes(buf) + data == b""
        assert closed
        sock.close()
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0), proxy.telemetry.tunnels_active


def test_client_fin_before_the_101(make_proxy, raw_upstream):
    """Rule 5: "Half-closes are propagated (a FIN one way does not cut the other way)": a client
    that sends its handshake then FIN still gets the 101 and what follows; the upstream sees
    the FIN after the 101, and can keep talking until it closes."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request() + b"early")
        sock.shutdown(socket.SHUT_WR)
        conn = up.accept()
        conn.read_head()
        time.sleep(0.2)  # let the FIN reach the proxy first
        conn.send(SWITCH_WS + b"hello")
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        assert recv_exactly(sock, 5, buf) == b"hello"
        assert conn.read_until_close(timeout=5) == b"early"  # then the client's FIN
        conn.send(b"after-your-fin")
        assert recv_exactly(sock, 14, buf) == b"after-your-fin"
        conn.close()
        data, closed = read_to_eof(sock, 5)
        assert bytes(buf) + data == b""
        assert closed


def test_a_mebibyte_of_early_bytes_is_held_then_delivered_in_order(make_proxy, raw_upstream):
    """Rule 2: "Bytes the client sent behind its request head are held (up to a small bound)
    and reach the upstream only after that 101"; rule 5: "Bytes are never reordered,
    duplicated or dropped." A client that sends 1 MiB right behind its handshake: nothing of
    it reaches the upstream before the 101, all of it after, in order."""
    early = hashlib.sha256(b"early").digest() * (32 * 1024)  # 1 MiB
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address, timeout=WAIT) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(ws_request() + early)

        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        conn = up.accept()
        conn.read_head()
        data, _ = quiet_read(conn.sock, QUIET)
        assert bytes(conn.received) + data == b"", "early bytes went up before the 101"
        conn.send(SWITCH_WS)
        head, _ = read_response_head(sock)
        assert status_of(head) == 101
        assert conn.read_exactly(len(early), timeout=WAIT) == early
        writer.join(WAIT)


def test_early_final_answer_then_reuse(make_proxy, raw_upstream):
    """Rule 6: "keep-alive on both sides, ... streamed bodies in both directions". An upstream
    may answer before it read the body (README: "the client connection then closes after the
    response"). A client that finishes its body and reuses the connection must then have been
    told so (RFC 9112 §9.6: `Connection: close` in that response), or be served."""

    def handler(conn: RawConn) -> None:
        conn.read_head(timeout=WAIT)
        conn.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
        respond_ok_forever(conn)

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        status, headers, body, rest = read_response(sock)
        assert (status, body) == (403, b"nope")
        if headers.get(b"connection", b"").lower() == b"close":
            _, closed = read_to_eof(sock, 5)
            assert closed
            return
        sock.sendall(b"0123456789GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _, _ = read_response(sock, rest)
        assert status == 200


# --- rule 5: tunnels ---------------------------------------------------------------------------


def test_one_byte_ping_pong_2000_times(make_proxy, raw_upstream):
    """Rule 5: "Bytes are never reordered, duplicated or dropped" - 2,000 one-byte round trips,
    each answered by the upstream with the next byte value."""
    rounds = 2000

    def handler(conn: RawConn) -> None:
        accept_101(conn)
        for _ in range(rounds):
            b = conn.read_exactly(1, timeout=WAIT)
            conn.send(bytes([(b[0] + 1) % 256]))

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    sock, rest = raw_tunnel(proxy.address)
    assert rest == b""
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(rounds):
            sock.sendall(bytes([i % 256]))
            assert sock.recv(1) == bytes([(i + 1) % 256]), i


def test_hundred_concurrent_tunnels_with_checksums(make_proxy, raw_upstream):
    """Rule 5: "Bytes are never reordered, duplicated or dropped", across 100 tunnels at once,
    each moving 200 KiB up and 200 KiB down (seeded per tunnel), checked by sha256."""
    n, size = 100, 200 * 1024
    up_hashes: dict[bytes, str] = {}
    errors: list[BaseException] = []

    def payload(tag: bytes, direction: bytes) -> bytes:
        seed = hashlib.sha256(tag + direction).digest()
        return (seed * (size // len(seed) + 1))[:size]

    def handler(conn: RawConn) -> None:
        try:
            head = accept_101(conn)
            tag = head.split(b" ")[1]
            threading.Thread(
                target=lambda: (
                    conn.sock.sendall(payload(tag, b"down")),
                    conn.sock.shutdown(socket.SHUT_WR),
                ),
                daemon=True,
            ).start()
            got = bytes(conn.received) + conn.read_until_close(timeout=WAIT * 2)
            up_hashes[tag] = hashlib.sha256(got).hexdigest()
        except BaseException as exc:
            errors.append(exc)

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))

    def client(i: int) -> bool:
        tag = b"/t%d" % i
        sock, rest = raw_tunnel(proxy.address, tag)
        with sock:
            sock.settimeout(WAIT * 2)
            writer = threading.Thread(
                target=lambda: (sock.sendall(payload(tag, b"up")), sock.shutdown(socket.SHUT_WR)),
                daemon=True,
            )
            writer.start()
            got = bytearray(rest)
            while data := sock.recv(65536):
                got += data
            writer.join(WAIT)
        return bytes(got) == payload(tag, b"down")

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(client, range(n), timeout=WAIT * 4))
    assert all(results), results.count(False)
    assert eventually(lambda: len(up_hashes) == n, WAIT), (len(up_hashes), errors)
    assert not errors, errors
    for i in range(n):
        tag = b"/t%d" % i
        assert up_hashes[tag] == hashlib.sha256(payload(tag, b"up")).hexdigest(), tag
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0), proxy.telemetry.tunnels_active


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_reset_mid_tunnel_closes_the_other_side(make_proxy, raw_upstream, side):
    """Rule 5: both sockets close when the tunnel is done (README: "on a reset from either
    side"): after a reset (SO_LINGER 0) by one side mid-tunnel, the other side sees its
    connection closed within 5 s, and `upgradeproxy_tunnels_active` returns to 0."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    client = raw_client(proxy.address, timeout=WAIT)
    try:
        client.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(SWITCH_WS)
        head, buf = read_response_head(client)
        assert status_of(head) == 101
        client.sendall(b"x" * 1000)
        assert conn.read_exactly(1000) == b"x" * 1000
        conn.send(b"y" * 1000)
        assert recv_exactly(client, 1000, buf) == b"y" * 1000
        assert eventually(lambda: proxy.telemetry.tunnels_active == 1)
        if side == "client":
            rst(client)
            data, closed = read_to_eof(conn.sock, 5)
        else:
            rst(conn.sock)
            data, closed = read_to_eof(client, 5)
        assert data == b""
        assert closed
    finally:
        with contextlib.suppress(OSError):
            client.close()
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0), proxy.telemetry.tunnels_active


def test_slow_reader_holds_back_the_writer_end_to_end(make_proxy, raw_upstream):
    """Rule 5: "Back-pressure holds: a slow reader slows the writer, memory per tunnel stays
    bounded." The upstream tries to push 96 MiB at a client that does not read: its writes
    stall with far less than that accepted (only socket buffers and one pipe in between), and
    once the client reads, every byte arrives in order."""
    total, piece = 96 << 20, 64 << 10
    chunk = hashlib.sha256(b"bp").digest() * (piece // 32)
    written = [0]
    done = threading.Event()

    def handler(conn: RawConn) -> None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        accept_101(conn)
        conn.sock.settimeout(30)
        try:
            while written[0] < total:
                conn.sock.sendall(chunk)
                written[0] += piece
            conn.sock.shutdown(socket.SHUT_WR)
        finally:
            done.set()

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(WAIT)
    sock.connect(proxy.address)
    with sock:
        sock.sendall(ws_request())
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        # Wait until the writer stops making progress (bounded), then check how far it got.
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not done.is_set():
            if written[0] != last:
                last, still_since = written[0], time.monotonic()
            elif time.monotonic() - still_since > 0.5:
                break
            time.sleep(0.05)
        stalled_at = written[0]
        assert not done.is_set(), "the upstream wrote 96 MiB to a client that never read"
        assert stalled_at < 64 << 20, stalled_at
        got, sha = len(buf), hashlib.sha256(bytes(buf))
        while data := sock.recv(1 << 18):
            got += len(data)
            sha.update(data)
    expected = hashlib.sha256()
    for _ in range(total // piece):
        expected.update(chunk)
    assert got == total
    assert sha.digest() == expected.digest()


# --- rule 4: forwarding ---------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_several_x_forwarded_for_fields(make_proxy, raw_upstream, trusted):
    """Rule 4: "Client-supplied ones are replaced, unless the peer is in `trusted_proxies`, in
    which case the proxy appends to them." Several `X-Forwarded-For` fields are one list (RFC
    9110 §5.3): appended to in order when trusted, replaced when not."""
    up = raw_upstream(respond_ok_forever)
    extra = 'trusted_proxies: ["127.0.0.0/8"]\n' if trusted else ""
    proxy = make_proxy(proxy_yaml(up.port, extra=extra + FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\n"
            b"X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\nForwarded: for=9.9.9.9\r\n\r\n"
        )
        assert read_response(sock)[0] == 200
    head = up.accept().heads[0]
    xff = elements(head, b"x-forwarded-for")
    if trusted:
        assert xff == [b"1.1.1.1", b"2.2.2.2", b"3.3.3.3", b"127.0.0.1"], head
    else:
        assert xff == [b"127.0.0.1"], head
        assert b"9.9.9.9" not in head


def test_via_appended_on_the_response(make_proxy, raw_upstream):
    """Rule 4 / RFC 9110 §7.6.3: each intermediary appends its own `Via` element, after those
    already present; README: "`Via` is always appended ..., on requests and responses"."""

    def handler(conn: RawConn) -> None:
        conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nVia: 1.1 backend-lb\r\nContent-Length: 2\r\n\r\nok")

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, extra=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = read_response_head(sock)
    via = elements(head, b"via")
    assert len(via) == 2, head
    assert via[0] == b"1.1 backend-lb", head


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
        proxy_yaml(up.port, extra='timeouts: {upstream_response: "300ms", drain: 1}')
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
    proxy = make_proxy(proxy_yaml(up.port, route='path_prefix: "/api"', extra=FAST_DRAIN))
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
    byte per write (TCP_NODELAY, ~100 writes) within that time is proxied normally."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, extra="timeouts: {request_header: 10, drain: 1}"))
    data = b"GET /slowly HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * 40 + b"\r\n\r\n"
    with raw_client(proxy.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            time.sleep(0.002)
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
    proxy = make_proxy(proxy_yaml(up.port, extra='timeouts: {idle: "500ms", drain: 1}'))
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
    "streamed bodies in both directions". An upload that takes 2 s, with a byte every 0.2 s
    (well within `idle`), to an upstream that answers as soon as the body is complete, gets
    the upstream's answer: the upstream cannot be "slower than `upstream_response`" before it
    has the request it must respond to (nginx's proxy_read_timeout and Envoy's route timeout
    also start once the request is sent)."""

    def handler(conn: RawConn) -> None:
        conn.read_head(timeout=WAIT)
        body = conn.read_exactly(10, timeout=WAIT)
        conn.send(ok_response(b"got " + body))

    up = raw_upstream(handler)
    proxy = make_proxy(
        proxy_yaml(up.port, extra='timeouts: {upstream_response: "600ms", idle: 5, drain: 1}')
    )
    with raw_client(proxy.address, timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        for i in range(10):
            time.sleep(0.2)
            try:
                sock.sendall(b"%d" % i)
            except OSError:
                break  # the proxy gave up on us; the response below says why
        status, _, body, _ = read_response(sock)
    assert (status, body) == (200, b"got 0123456789")


# --- rule 8: load balancing -------------------------------------------------------------------


def named_upstream(raw_upstream, name: bytes, hold: threading.Event | None = None):
    """Answers `name` with `Connection: close` (so every request is a fresh pick); a request
    for /hold waits for `hold` first."""
    heads: list[bytes] = []

    def handler(conn: RawConn) -> None:
        head = conn.read_head(timeout=WAIT)
        heads.append(head)
        if b"upgrade: websocket" in head.lower():
            key = values(head, b"sec-websocket-key")[0]
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            conn.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + name
            )
            conn.read_until_close(timeout=WAIT)
            return
        if head.startswith(b"GET /hold ") and hold is not None:
            hold.wait(WAIT)
        conn.send(ok_response(name, b"Connection: close\r\n"))
        conn.read_until_close(timeout=WAIT)

    up = raw_upstream(handler)
    up.heads_seen = heads
    return up


def balanced_yaml(servers: list[str], balance: str = "round_robin", timeouts: str = "") -> str:
    items = "\n".join(f"      - {s}" for s in servers)
    return f"""
listen:
  - address: "127.0.0.1:0"
upstreams:
  app:
    balance: {balance}
    servers:
{items}
routes:
  - upstream: app
timeouts: {{drain: 1{timeouts}}}
"""


def get(address, path: bytes = b"/") -> tuple[int, bytes]:
    with raw_client(address, timeout=WAIT) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body, _ = read_response(sock)
    return status, body


def test_round_robin_5_1_1_is_smooth_and_repeats(make_proxy, raw_upstream):
    """Rule 8: "`round_robin` honours weights deterministically". README: "nginx's smooth
    weighted round robin ... (`5,1,1` gives `a a b a c a a`)". Three cycles of 7 picks."""
    ups = {n: named_upstream(raw_upstream, n) for n in (b"a", b"b", b"c")}
    servers = [
        f'{{address: "127.0.0.1:{ups[n].port}", weight: {w}}}'
        for n, w in ((b"a", 5), (b"b", 1), (b"c", 1))
    ]
    proxy = make_proxy(balanced_yaml(servers))
    picks = []
    for i in range(21):
        status, body = get(proxy.address, b"/%d" % i)
        assert status == 200
        picks.append(body)
    assert picks[:7] == [b"a", b"a", b"b", b"a", b"c", b"a", b"a"], picks
    assert picks[7:14] == picks[:7], picks
    assert picks[14:] == picks[:7], picks


def test_all_servers_refusing_is_502(make_proxy):
    """Rule 7: "upstream refused ... 502"; rule 8: each refusing server is skipped and the next
    one tried - when none is left the client gets a short 502, and keeps its connection."""
    proxy = make_proxy(balanced_yaml([f'"127.0.0.1:{free_port()}"' for _ in range(3)]))
    with raw_client(proxy.address) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, _ = read_response(sock)
            assert status == 502
            assert_short_error(body)


def test_refused_server_is_skipped_for_an_upgrade(make_proxy, raw_upstream):
    """Rule 8: "A server that refuses the connection is skipped and the next one tried (before
    any byte was sent)" - an upgrade too: the tunnel opens on the next server."""
    good = named_upstream(raw_upstream, b"good")
    proxy = make_proxy(balanced_yaml([f'"127.0.0.1:{free_port()}"', f'"127.0.0.1:{good.port}"']))
    for _ in range(2):
        sock, rest = raw_tunnel(proxy.address)
        with sock:
            assert recv_exactly(sock, 4, bytearray(rest)) == b"good"


def test_least_conn_counts_in_flight_requests(make_proxy, raw_upstream):
    """Rule 8: "`least_conn` counts open tunnels as well as in-flight requests": while one
    request is held on a server, every new request goes to the other one."""
    hold = threading.Event()
    a = named_upstream(raw_upstream, b"a", hold)
    b = named_upstream(raw_upstream, b"b", hold)
    proxy = make_proxy(
        balanced_yaml([f'"127.0.0.1:{a.port}"', f'"127.0.0.1:{b.port}"'], balance="least_conn")
    )
    held = raw_client(proxy.address, timeout=WAIT)
    try:
        held.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert eventually(lambda: len(a.heads_seen) + len(b.heads_seen) == 1)
        busy, other = (b"a", b"b") if a.heads_seen else (b"b", b"a")
        for i in range(4):
            assert get(proxy.address, b"/during/%d" % i) == (200, other), i
        hold.set()
        assert read_response(held)[2] == busy
    finally:
        hold.set()
        held.close()


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full, so a new connection is never accepted (SYNs are
    dropped): a connect to it times out instead of being refused."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(listener.getsockname())
        except OSError:
            s.close()
            break
        fillers.append(s)
    return listener, fillers


def test_server_not_accepting_within_connect_timeout_is_skipped(make_proxy, raw_upstream):
    """README rule 8: "A server that refuses the connection or does not accept it within
    `timeouts.connect` is skipped ... and the next one is tried"; README rule 7: with no
    server accepting within `timeouts.connect`, **504**."""
    hole, fillers = blackhole()
    try:
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(hole.getsockname())
            pytest.skip("cannot make a non-accepting listener on this kernel")
        except TimeoutError:
            pass
        finally:
            probe.close()
        good = named_upstream(raw_upstream, b"good")
        hole_addr = f'"127.0.0.1:{hole.getsockname()[1]}"'
        proxy = make_proxy(
            balanced_yaml([hole_addr, f'"127.0.0.1:{good.port}"'], timeouts=', connect: "300ms"')
        )
        for i in range(3):
            assert get(proxy.address, b"/%d" % i) == (200, b"good")
        alone = make_proxy(balanced_yaml([hole_addr], timeouts=', connect: "300ms"'))
        status, body = get(alone.address)
        assert status == 504
        assert_short_error(body)
    finally:
        for s in fillers:
            s.close()
        hole.close()
