"""Malformed and ambiguous requests (rule 7): each is answered with a short error and a close,
and nothing of it reaches an upstream; valid but unusual framing, absolute-form targets and
pipelining around a bad request still behave.

Raw blocking sockets on 127.0.0.1, every wait bounded; each docstring quotes the contract
sentence (/work/shared/interface.md), the README choice or the RFC section it checks.
"""

from __future__ import annotations

import pytest

from tests.support.clients import http, raw_client, read_response, read_to_eof
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.sentinels import first_upstream_request, is_sentinel, only_the_sentinel_arrives
from tests.support.waiting import WAIT
from tests.support.wire import assert_short_error, names, ok_response, values


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
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    status, headers = error_then_close(proxy.address, data)
    assert status == 400, (status, data)
    if b"connection" in headers:
        assert headers[b"connection"].lower() == b"close"
    only_the_sentinel_arrives(proxy.address, up)


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
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    data = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    status, _ = error_then_close(proxy.address, data)
    assert status in (400, 501), status
    only_the_sentinel_arrives(proxy.address, up)


def test_http10_request_with_transfer_encoding_is_400(make_proxy, raw_upstream):
    """RFC 9112 §6.1: "A server or client that receives an HTTP/1.0 message containing a
    Transfer-Encoding header field MUST treat the message as if the framing is faulty, even if
    a Content-Length is present, and close the connection after processing the message."
    Rule 7: malformed "per RFC 9112 and to shut the door on request smuggling" is a 400 (then
    close), and "Nothing of a malformed request reaches an upstream"."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    data = (
        b"POST /old HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    status, _ = error_then_close(proxy.address, data)
    assert status == 400
    only_the_sentinel_arrives(proxy.address, up)


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
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    status, _ = error_then_close(
        proxy.address,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert status == 400
    conn, head = first_upstream_request(proxy.address, up)
    if is_sentinel(head):
        return  # nothing at all reached the upstream before the sentinel
    received = head + conn.read_until_close(timeout=5)
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
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"idle": 30, "drain": 1}))
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
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    status, _ = error_then_close(proxy.address, b"GET / HTTP/1.1\nHost: x\nX-A: 1\n folded\n\r\n")
    assert status == 400
    only_the_sentinel_arrives(proxy.address, up)


def test_431_for_a_whole_head_ending_lf_crlf(make_proxy, raw_upstream):
    """Rule 7: "head too large 431" (`limits.max_request_header_bytes`), also for a head that
    arrives whole in one write and ends with LF CRLF (RFC 9112 §2.2 bare-LF leniency)."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        proxy_yaml(up.port, limits={"max_request_header_bytes": 1024}, timeouts=FAST_DRAIN)
    )
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\nHost: x\nX-Big: " + b"a" * 4000 + b"\n\r\n")
        status, _, body, _ = read_response(sock)
    assert_short_error(body)
    assert status == 431
    only_the_sentinel_arrives(proxy.address, up)


def test_bare_lf_head_with_crlfs_in_its_body(make_proxy, raw_upstream):
    """The proxy accepts bare-LF heads (RFC 9112 §2.2, see the test above); the body that
    follows is content, not header lines: a CRLF CRLF or a line starting with a space inside
    the body must not turn a valid request into a 400 (obs-fold) or a 431."""
    store: list[tuple[bytes, bytes]] = []
    up = _recording_upstream(raw_upstream, store)
    proxy = make_proxy(
        proxy_yaml(up.port, limits={"max_request_header_bytes": 1024}, timeouts=FAST_DRAIN)
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
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n" + body)
        status, _, got, _ = read_response(sock)
        assert (status, got) == (200, b"ok")
        # keep-alive survives the odd framing: the body was consumed exactly
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    (head, sent), _ = store
    assert sent == b"hello"
    assert b"x-trailer" not in names(head)
    assert len(values(head, b"content-length") + values(head, b"transfer-encoding")) == 1, head


def test_bare_lf_head_is_accepted_or_rejected_never_hangs(make_proxy, raw_upstream):
    """RFC 9112 §2.2: "a recipient MAY recognize a single LF as a line terminator". Either
    answer is allowed; what reaches the upstream is a clean CRLF head, and a 400 closes."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
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
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
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
    proxy = make_proxy(proxy_yaml(up.port, route={"host": "public.example"}, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET http://public.example/x?q=1 HTTP/1.1\r\nHost: internal.example\r\n\r\n")
        status, _, body, _ = read_response(sock)
    if status == 400:  # rejecting the mismatch outright is also safe
        assert_short_error(body)
        only_the_sentinel_arrives(proxy.address, up, host=b"public.example")
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
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    status, _ = error_then_close(
        proxy.address, b"GET http://app.example/ HTTP/1.1\r\nX-A: 1\r\n\r\n"
    )
    assert status == 400
    only_the_sentinel_arrives(proxy.address, up)


# --- pipelining ----------------------------------------------------------------------------


def test_pipelined_malformed_request_in_the_middle(make_proxy, raw_upstream):
    """Rule 7: "malformed request 400 (then close)" and "Nothing of a malformed request reaches
    an upstream": with three requests in one packet, the first is answered, the bad second gets
    a 400, the connection closes, and the third never reaches the upstream."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
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
    # A sentinel on a new client connection goes up on the pooled connection of /one, behind
    # anything the proxy sent there, on the only connection it opened.
    assert http(proxy.address, "/sentinel")[0] == 200
    heads = [h for c in up.conns for h in c.heads]
    assert [h.split(b" ")[1] for h in heads] == [b"/one", b"/sentinel"]
    assert len(up.conns) == 1
    assert b"/three" not in up.all_received()


def test_nothing_after_connection_close_reaches_upstream(make_proxy, raw_upstream):
    """Rule 6 keep-alive, RFC 9112 §9.6: a server that receives "close" "MUST NOT process any
    further requests received on that connection": the pipelined second request is ignored."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
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
    assert http(proxy.address, "/sentinel")[0] == 200  # behind anything sent on /a's connection
    assert [h.split(b" ")[1] for c in up.conns for h in c.heads] == [b"/a", b"/sentinel"]
    assert len(up.conns) == 1
