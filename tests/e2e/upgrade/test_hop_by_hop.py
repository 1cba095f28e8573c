"""Rule 3: hop-by-hop headers are removed on every hop, both ways, and the proxy frames bodies
itself (Content-Length or chunked), with nothing after the body on the upstream connection."""

from __future__ import annotations

from tests.support.clients import (
    read_response,
    read_response_head,
    recv_exactly,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.sentinels import (
    next_request_follows,
)
from tests.support.wire import (
    H2_SETTINGS,
    elements,
    names,
    ok_response,
    request,
    status_of,
    values,
)


def test_hop_by_hop_removed_on_the_way_up(make_proxy, raw_upstream, client):
    """Rule 3: "On every hop the proxy removes `Connection`, every header named in it,
    `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` ...,
    `HTTP2-Settings`, `Proxy-Authorization` ... and frames bodies itself" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(
        request(
            b"Connection: keep-alive, X-Secret",
            b"Connection: X-Other",
            b"X-Secret: hush",
            b"x-other: hush",
            b"Keep-Alive: timeout=5, max=100",
            b"Proxy-Connection: keep-alive",
            b"TE: trailers",
            b"Trailer: X-Checksum",
            b"Transfer-Encoding: chunked",
            b"Proxy-Authorization: Basic dXNlcjpwYXNz",
            b"HTTP2-Settings: " + H2_SETTINGS,
            b"X-Keep: yes",
            method=b"POST",
            target=b"/up",
            body=b"5\r\nhello\r\n0\r\n\r\n",
        )
    )
    conn = up.accept()
    head = conn.read_head()
    present = names(head)
    for gone in (
        b"x-secret",
        b"x-other",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"http2-settings",
        b"upgrade",
    ):
        assert gone not in present, (gone, head)
    for token in elements(head, b"connection"):
        assert token.lower() in (b"keep-alive", b"close"), head
    assert values(head, b"x-keep") == [b"yes"]
    assert [v.lower() for v in values(head, b"transfer-encoding")] == [b"chunked"]
    assert read_chunked(conn) == b"hello"
    conn.send(ok_response())
    assert read_response(c)[0] == 200
    next_request_follows(c, conn)  # and no byte after the last chunk


def test_hop_by_hop_removed_on_the_way_down(make_proxy, raw_upstream, client):
    """Rule 3: "On every hop the proxy removes `Connection`, every header named in it,
    `Keep-Alive`, ..., `Trailer`, ..., `Upgrade` ... and `Proxy-Authenticate`" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(request(target=b"/down"))
    conn = up.accept()
    conn.read_head()
    conn.send(
        b"HTTP/1.1 200 OK\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b'Proxy-Authenticate: Basic realm="x"\r\n'
        b"Connection: X-Foo\r\n"
        b"X-Foo: bar\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c, websocket\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"HTTP2-Settings: " + H2_SETTINGS + b"\r\n"
        b"X-Keep: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    head, buf = read_response_head(c)
    assert status_of(head) == 200
    present = names(head)
    for gone in (
        b"keep-alive",
        b"proxy-authenticate",
        b"x-foo",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"http2-settings",
    ):
        assert gone not in present, (gone, head)
    for token in elements(head, b"connection"):
        assert token.lower() in (b"keep-alive", b"close"), head
    assert values(head, b"x-keep") == [b"yes"]
    assert recv_exactly(c, 2, buf) == b"ok"


def test_connection_cannot_remove_proxy_forwarding_headers(make_proxy, raw_upstream, client):
    """Rule 3: "Headers the client names in `Connection` are removed before the proxy adds its
    own, so `Connection: X-Forwarded-For` cannot remove the proxy's `X-Forwarded-For`." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(
        request(
            b"Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Via",
            b"X-Forwarded-For: 6.6.6.6",
        )
    )
    conn = up.accept()
    head = conn.read_head()
    assert values(head, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(head, b"x-forwarded-proto") == [b"http"]
    assert values(head, b"x-forwarded-host") == [b"app.example"]
    assert values(head, b"via")
    conn.send(ok_response())
    assert read_response(c)[0] == 200


def read_chunked(conn) -> bytes:
    """Decode one chunked body from `conn`; fail on trailer fields."""
    body = bytearray()
    while True:
        while b"\r\n" not in conn.received:
            conn.sock.settimeout(5)
            data = conn.sock.recv(65536)
            if not data:
                raise EOFError(f"closed inside a chunked body: {bytes(conn.received)!r}")
            conn.received += data
        line, _, _ = bytes(conn.received).partition(b"\r\n")
        conn.read_exactly(len(line) + 2)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            assert conn.read_exactly(2) == b"\r\n", "trailer fields sent upstream"
            break
        body += conn.read_exactly(size)
        assert conn.read_exactly(2) == b"\r\n"
    return bytes(body)


def test_chunked_request_body_forwarded(make_proxy, raw_upstream, client):
    """Rule 3: the proxy "frames bodies itself (Content-Length or chunked)" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(
        request(
            b"Transfer-Encoding: chunked",
            method=b"POST",
            target=b"/upload",
            body=b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        )
    )
    conn = up.accept()
    head = conn.read_head()
    assert [v.lower() for v in values(head, b"transfer-encoding")] == [b"chunked"]
    assert b"content-length" not in names(head)
    assert read_chunked(conn) == b"hello world"
    conn.send(ok_response(b"got it"))
    status, _, body, _ = read_response(c)
    assert (status, body) == (200, b"got it")
    next_request_follows(c, conn)  # and no byte after the last chunk


def test_content_length_request_body_forwarded(make_proxy, raw_upstream, client):
    """Rule 3: the proxy "frames bodies itself (Content-Length or chunked)" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(
        request(b"Content-Length: 11", method=b"POST", target=b"/upload", body=b"hello world")
    )
    conn = up.accept()
    head = conn.read_head()
    assert values(head, b"content-length") == [b"11"]
    assert b"transfer-encoding" not in names(head)
    assert conn.read_exactly(11) == b"hello world"
    conn.send(ok_response(b"got it"))
    status, _, body, _ = read_response(c)
    assert (status, body) == (200, b"got it")
    next_request_follows(c, conn)  # and no byte after the body
