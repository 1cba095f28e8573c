"""Rule 17, ordinary requests: each HTTP/2 stream is one request through the same rules as an
HTTP/1.1 request (routing by :authority, forwarding headers, errors as the stream's response,
limits, metrics, access log), relayed to an HTTP/1.1 upstream with flow control both ways;
malformed requests are never forwarded. The client is the `h2` library; the upstream a raw
socket that sees the exact bytes."""

from __future__ import annotations

import logging
import socket
import threading

import h2.events
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.access_log import access_records
from tests.support.clients import free_port
from tests.support.configs import config_yaml, h2_yaml, listener, route
from tests.support.h2_clients import H2Peer
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.waiting import eventually
from tests.support.wire import ok_response


def _lines(head: bytes) -> list[bytes]:
    return head.split(b"\r\n")


def test_a_stream_is_routed_by_authority_and_forwarded_as_http11(make_proxy, raw_upstream):
    """:authority routes and becomes Host; the forwarding headers are added; Via names the
    client's HTTP/2; the response comes back on the stream."""
    other, chat = raw_upstream(respond_ok_forever), raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        config_yaml({"other": other.port, "chat": chat.port},
                    [route("chat", host="chat.example"), route("other")],
                    listen=listener(http2=True))
    )  # fmt: skip
    client = H2Peer(proxy.address)
    sid = client.request("/room?x=1", authority="chat.example", extra=[(b"x-app", b"1")])
    status, headers, body = client.response(sid)
    assert (status, body) == (200, b"ok")
    assert headers[b"via"] == b"1.1 upgradeproxy"
    assert headers[b"x-request-id"]
    head = chat.accept().heads[0]
    lines = _lines(head)
    assert lines[0] == b"GET /room?x=1 HTTP/1.1"
    assert b"host: chat.example" in lines
    assert b"x-app: 1" in lines
    assert b"X-Forwarded-For: 127.0.0.1" in lines
    assert b"X-Forwarded-Proto: http" in lines
    assert b"X-Forwarded-Host: chat.example" in lines
    assert b"Via: 2 upgradeproxy" in lines
    assert not other.conns


MALFORMED = [
    pytest.param([(b"connection", b"keep-alive")], id="Connection"),
    pytest.param([(b"upgrade", b"websocket")], id="Upgrade"),
    pytest.param([(b"keep-alive", b"timeout=5")], id="Keep-Alive"),
    pytest.param([(b"proxy-connection", b"close")], id="Proxy-Connection"),
    pytest.param([(b"transfer-encoding", b"chunked")], id="Transfer-Encoding"),
    pytest.param([(b"te", b"gzip")], id="TE other than trailers"),
    pytest.param([(b"X-Upper", b"1")], id="upper-case name"),
]


@pytest.mark.parametrize("extra", MALFORMED)
def test_malformed_requests_are_refused_and_never_forwarded(make_proxy, raw_upstream, extra):
    """RFC 9113 §8.2.2: connection-specific fields and TE other than trailers make a request
    malformed: a 400 on its stream, nothing upstream; the connection goes on (the sentinel
    request after it is the only one the upstream sees)."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    bad = client.request("/bad", extra=extra)
    status, _, body = client.response(bad)
    assert status == 400
    assert body == b"400 Bad Request\n"
    good = client.request("/sentinel")
    assert client.response(good)[0] == 200
    heads = up.accept().heads
    assert len(heads) == 1
    assert heads[0].startswith(b"GET /sentinel ")


PSEUDO = [
    pytest.param([(b":scheme", b"http"), (b":path", b"/x")], id="missing :method"),
    pytest.param([(b":method", b"GET"), (b":scheme", b"http")], id="missing :path"),
    pytest.param(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":foo", b"1")],
        id="unknown pseudo-header",
    ),
    pytest.param(
        [(b":method", b"GET"), (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")],
        id="duplicated pseudo-header",
    ),
    pytest.param(
        [(b":method", b"GET"), (b":scheme", b"http"), (b"x", b"1"), (b":path", b"/")],
        id="pseudo-header after a regular field",
    ),
]


@pytest.mark.parametrize("fields", PSEUDO)
def test_bad_pseudo_headers_are_refused_and_never_forwarded(make_proxy, raw_upstream, fields):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    bad = client.request(fields=fields)
    assert client.response(bad)[0] == 400
    good = client.request("/sentinel")
    assert client.response(good)[0] == 200
    assert [h.split(b" ")[1] for h in up.accept().heads] == [b"/sentinel"]


def test_rule_7_errors_are_the_streams_response(make_proxy, raw_upstream):
    """404 without a route, 502 when the upstream refuses, 405 for a CONNECT without
    :protocol, 504 for a slow upstream -- each on its own stream, the connection intact."""
    silent = raw_upstream(lambda conn: conn.read_until_close(30))
    proxy = make_proxy(
        config_yaml({"gone": free_port(), "slow": silent.port},
                    [route("gone", path_prefix="/gone"), route("slow", path_prefix="/slow")],
                    listen=listener(http2=True), timeouts={"upstream_response": 0.3})
    )  # fmt: skip
    client = H2Peer(proxy.address)
    missing = client.request("/nowhere")
    gone = client.request("/gone/x")
    slow = client.request("/slow/x")
    connect = client.request(
        fields=[(b":method", b"CONNECT"), (b":authority", b"example.com:443")], end=False
    )
    assert client.response(missing)[0] == 404
    assert client.response(gone)[0] == 502
    assert client.response(connect)[0] == 405
    status, headers, body = client.response(slow)
    assert status == 504
    assert body == b"504 Gateway Timeout\n"
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert not client.closed


def _read_chunked(conn: RawConn) -> tuple[bytes, bytes]:
    """(body, trailer section) of a chunked request body."""
    body = b""
    while True:
        line = b""
        while not line.endswith(b"\r\n"):
            line += conn.read_exactly(1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            trailers = b""
            while not trailers.endswith(b"\r\n\r\n") and trailers != b"\r\n":
                trailers += conn.read_exactly(1)
            return body, trailers
        body += conn.read_exactly(size)
        conn.read_exactly(2)


def test_request_body_streams_upstream_chunked_with_its_trailers(make_proxy, raw_upstream):
    """A body without Content-Length goes upstream chunked, DATA by DATA, and its trailers
    ride in the chunked trailer section (HTTP/1.1 can carry them there)."""
    got: dict[str, bytes] = {}

    def handler(conn: RawConn) -> None:
        got["head"] = conn.read_head()
        got["body"], got["trailers"] = _read_chunked(conn)
        conn.send(ok_response(b"thanks"))

    up = raw_upstream(handler)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid = client.request("/upload", method="POST", end=False, extra=[(b"te", b"trailers")])
    client.send(sid, b"hello ")
    client.send(sid, b"world")
    client.conn.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
    client.flush()
    assert client.response(sid)[:3:2] == (200, b"thanks")
    assert b"Transfer-Encoding: chunked" in got["head"]
    assert got["body"] == b"hello world"
    assert got["trailers"].lower() == b"x-checksum: abc\r\n\r\n"


def test_request_body_with_content_length_keeps_it(make_proxy, raw_upstream):
    got: dict[str, bytes] = {}

    def handler(conn: RawConn) -> None:
        got["head"] = conn.read_head()
        got["body"] = conn.read_exactly(11)
        conn.send(ok_response())

    up = raw_upstream(handler)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid = client.request("/u", method="PUT", end=False, extra=[(b"content-length", b"11")])
    client.send(sid, b"hello world", end=True)
    assert client.response(sid)[0] == 200
    assert b"Content-Length: 11" in got["head"]
    assert b"chunked" not in got["head"]
    assert got["body"] == b"hello world"


def test_expect_100_continue(make_proxy, raw_upstream):
    """The upstream's 100 Continue reaches the client as an informational response before
    the client sends its body."""
    got: dict[str, bytes] = {}

    def handler(conn: RawConn) -> None:
        got["head"] = conn.read_head()
        conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        got["body"] = conn.read_exactly(4)
        conn.send(ok_response(b"done"))

    up = raw_upstream(handler)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    extra = [(b"content-length", b"4"), (b"expect", b"100-continue")]
    sid = client.request("/big", method="POST", end=False, extra=extra)
    assert client.until(lambda: bool(client.of(sid, h2.events.InformationalResponseReceived)))
    assert (
        dict(client.of(sid, h2.events.InformationalResponseReceived)[0].headers)[b":status"]
        == b"100"
    )
    client.send(sid, b"data", end=True)
    assert client.response(sid)[::2] == (200, b"done")
    assert b"expect: 100-continue" in got["head"]
    assert got["body"] == b"data"


def test_a_slow_client_is_not_buffered_for(make_proxy, raw_upstream):
    """The upstream is read only as the client's window allows: a client that stops
    crediting its window holds the upstream back (its 32 MiB cannot all leave), and gets
    every byte, in order, once it reads again."""
    size = 32 << 20
    payload = bytes(range(256)) * (size // 256)
    done = threading.Event()

    def handler(conn: RawConn) -> None:
        conn.read_head()
        # A small send buffer: the kernel's own buffering must not hide the proxy's.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        conn.sock.settimeout(60)
        conn.sock.sendall(payload)
        done.set()

    up = raw_upstream(handler)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    client.auto_ack = False
    sid = client.request("/download")
    assert client.until(lambda: len(client.data(sid)) >= 65535)
    # A sentinel round trip: the proxy has handled everything before it.
    client.conn.ping(b"sentinel")
    client.flush()
    assert client.until(lambda: any(isinstance(e, h2.events.PingAckReceived)
                                    for e in client.events))  # fmt: skip
    assert len(client.data(sid)) == 65535  # the default window, not a byte more
    assert not done.is_set()
    client.auto_ack = True
    client.conn.acknowledge_received_data(65535, sid)
    client.flush()
    assert client.until(lambda: client.finished(sid), timeout=60)
    assert client.data(sid) == payload
    assert done.wait(10)


def test_many_streams_at_once_on_one_connection(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sids = [client.request(f"/s{i}") for i in range(30)]
    assert all(client.response(sid)[0] == 200 for sid in sids)


def test_access_log_and_metrics_carry_http_version(make_proxy, raw_upstream, caplog):
    """Access-log lines gain `http_version`: "2" for a stream, "1.1" and "1.0" for HTTP/1.x
    requests; requests_total counts streams like any request."""
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    assert client.response(client.request("/two"))[0] == 200
    for version in (b"1.1", b"1.0"):
        with socket.create_connection(proxy.address) as sock:
            sock.sendall(b"GET /one HTTP/%s\r\nHost: a\r\nConnection: close\r\n\r\n" % version)
            while sock.recv(65536):
                pass
    assert eventually(lambda: len(access_records(caplog)) >= 3)
    by_path = {}
    for rec in access_records(caplog):
        by_path.setdefault(rec["path"], []).append(rec["http_version"])
    assert by_path["/two"] == ["2"]
    assert sorted(by_path["/one"]) == ["1.0", "1.1"]
    metrics = text_string_to_metric_families(proxy.telemetry.render())
    counted = [
        sample.value
        for family in metrics
        if family.name == "upgradeproxy_requests"
        for sample in family.samples
        if sample.name == "upgradeproxy_requests_total" and sample.labels["code"] == "200"
    ]
    assert counted == [3]


def test_per_ip_limit_is_a_429_then_goaway(make_proxy, raw_upstream):
    """Rule 14: a client over max_connections_per_ip gets 429 on its connection's first
    request, then the connection closes (GOAWAY)."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port, limits={"max_connections_per_ip": 1}))
    holder = socket.create_connection(proxy.address)
    try:
        holder.sendall(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
        assert holder.recv(65536).startswith(b"HTTP/1.1 200")
        client = H2Peer(proxy.address)
        assert client.response(client.request("/second"))[0] == 429
        assert client.until(lambda: client.goaway() is not None)
        assert client.until(lambda: client.closed)
        assert [h.split(b" ")[1] for h in up.accept().heads] == [b"/hold"]
    finally:
        holder.close()
