"""Rule 17, WebSocket over HTTP/2 (RFC 8441): an extended CONNECT goes upstream as an HTTP/1.1
upgrade with a fresh key; the verified 101 becomes `200` on the stream, and the stream's DATA
and the upstream's bytes are relayed with flow control, half-close and reset mapping, and the
tunnel counts, times out and is logged like any other. Upstreams: the `websockets` library
(messages, subprotocols, permessage-deflate) and raw sockets (exact bytes)."""

from __future__ import annotations

import logging
import socket
import struct

import h2.events
import pytest

from tests.support.access_log import access_records
from tests.support.configs import config_yaml, h2_yaml, listener, route
from tests.support.h2_clients import H2Peer, WsOverH2
from tests.support.peers import RawConn, echo_after_switch, respond_ok_forever
from tests.support.waiting import eventually
from tests.support.wire import SWITCH_WS, ok_response


def _open(client: H2Peer, path: str = "/chat", extra=None) -> tuple[int, dict[bytes, bytes]]:
    sid = client.websocket(path, extra)
    return sid, client.head(sid)


def test_messages_both_ways_through_a_websockets_upstream(make_proxy, ws_upstream):
    """The upstream sees an HTTP/1.1 GET of :path with Host from :authority, Connection:
    Upgrade, Upgrade: websocket and a fresh key; text and binary, small and large, go both
    ways intact."""
    up = ws_upstream()
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, head = _open(client, "/chat?room=7", [(b"sec-websocket-key", b"from-the-client")])
    assert head[b":status"] == b"200"
    ws = WsOverH2(client, sid)
    ws.send("hello")
    assert ws.recv() == "hello"
    big = bytes(range(256)) * 8192  # 2 MiB: many DATA frames and window updates
    ws.send(big)
    assert ws.recv() == big
    request = up.requests[0]
    assert request.path == "/chat?room=7"
    assert request.headers["Host"] == "localhost"
    assert request.headers["Upgrade"].lower() == "websocket"
    assert "upgrade" in request.headers["Connection"].lower()
    assert request.headers["Sec-WebSocket-Version"] == "13"
    assert request.headers["Sec-WebSocket-Key"] != "from-the-client"


def test_subprotocol_is_negotiated_end_to_end(make_proxy, ws_upstream):
    """The client's Sec-WebSocket-Protocol goes upstream; the upstream's choice comes back on
    the 200."""
    up = ws_upstream(subprotocols=["chat.v2"])
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, head = _open(client, extra=[(b"sec-websocket-protocol", b"chat.v1, chat.v2")])
    assert head[b":status"] == b"200"
    assert head[b"sec-websocket-protocol"] == b"chat.v2"
    ws = WsOverH2(client, sid)
    ws.send("x")
    assert ws.recv() == "x"


def test_permessage_deflate_is_negotiated_end_to_end(make_proxy, ws_upstream):
    from wsproto.extensions import PerMessageDeflate

    up = ws_upstream(compression="deflate")
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    offer = PerMessageDeflate()
    offered = f"{offer.name}; {offer.offer()}".encode()
    sid, head = _open(client, extra=[(b"sec-websocket-extensions", offered)])
    accepted = head[b"sec-websocket-extensions"].decode()
    assert accepted.startswith("permessage-deflate")
    offer.finalize(accepted)
    ws = WsOverH2(client, sid, extensions=[offer])
    text = "compress me " * 100_000
    ws.send(text)
    assert ws.recv() == text
    sent = sum(len(e.data) for e in client.of(sid, h2.events.DataReceived))
    assert sent < len(text) // 10  # the echo crossed the proxy compressed


@pytest.mark.parametrize(
    ("route", "protocol"),
    [
        pytest.param({"upgrade": []}, b"websocket", id="route allows no upgrade"),
        pytest.param({"upgrade": ["websocket"]}, b"foo", id="protocol not in the route's list"),
    ],
)
def test_a_protocol_the_route_does_not_allow_never_reaches_an_upstream(
    make_proxy, raw_upstream, route, protocol
):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port, route=route))
    client = H2Peer(proxy.address)
    sid = client.websocket("/chat", protocol=protocol)
    status = client.response(sid)[0]
    assert 400 <= status < 600
    assert client.response(client.request("/sentinel"))[0] == 200
    assert [h.split(b" ")[1] for h in up.accept().heads] == [b"/sentinel"]


def test_connect_without_protocol_is_405(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid = client.request(
        fields=[(b":method", b"CONNECT"), (b":authority", b"localhost:443")], end=False
    )
    assert client.response(sid)[0] == 405
    assert client.response(client.request("/sentinel"))[0] == 200
    assert len(up.accept().heads) == 1


def test_an_upstream_that_declines_answers_the_stream(make_proxy, raw_upstream):
    """Any other upstream answer is the stream's response."""

    def refuse(conn: RawConn) -> None:
        conn.read_head()
        conn.send(ok_response(b"no sockets here").replace(b"200 OK", b"403 Forbidden"))

    up = raw_upstream(refuse)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid = client.websocket("/chat")
    assert client.response(sid)[::2] == (403, b"no sockets here")


def test_a_101_with_a_wrong_accept_is_502(make_proxy, raw_upstream):
    """Rule 2's check, against the key the proxy sent."""

    def wrong(conn: RawConn) -> None:
        conn.read_head()
        conn.send(SWITCH_WS)  # the accept of the conftest's fixed key, not of ours

    up = raw_upstream(wrong)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    assert client.response(client.websocket("/chat"))[0] == 502


def _switching(key_from_head: bytes) -> bytes:
    import base64
    import hashlib

    for line in key_from_head.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            key = line.split(b":", 1)[1].strip()
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
    raise AssertionError("no key")


def raw_ws(after) -> object:
    """A raw upstream that answers the proxy's key correctly, then runs `after(conn)`."""

    def handler(conn: RawConn) -> None:
        head = conn.read_head()
        if b"upgrade: websocket" not in head.lower():
            conn.send(ok_response() + b"")  # a plain request (a sentinel)
            return
        conn.send(_switching(head))
        conn.sock.settimeout(30)
        after(conn)

    return handler


def test_end_stream_is_a_half_close_and_a_half_close_is_end_stream(make_proxy, raw_upstream):
    """Client END_STREAM -> upstream EOF, while the upstream can still answer; the upstream's
    FIN -> END_STREAM to the client."""

    def echo_to_eof(conn: RawConn) -> None:
        got = b""
        while data := conn.sock.recv(65536):
            got += data
        conn.sock.sendall(b"after eof: " + got)
        conn.sock.shutdown(socket.SHUT_WR)

    up = raw_upstream(raw_ws(echo_to_eof))
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, head = _open(client)
    assert head[b":status"] == b"200"
    client.send(sid, b"last words", end=True)
    assert client.until(lambda: bool(client.of(sid, h2.events.StreamEnded)))
    assert client.data(sid) == b"after eof: last words"
    assert not client.of(sid, h2.events.StreamReset)


def test_upstream_half_close_leaves_the_client_direction_open(make_proxy, raw_upstream):
    got: list[bytes] = []

    def shut_then_read(conn: RawConn) -> None:
        conn.sock.sendall(b"bye")
        conn.sock.shutdown(socket.SHUT_WR)
        while data := conn.sock.recv(65536):
            got.append(data)

    up = raw_upstream(raw_ws(shut_then_read))
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, _ = _open(client)
    assert client.until(lambda: bool(client.of(sid, h2.events.StreamEnded)))
    assert client.data(sid) == b"bye"
    client.send(sid, b"still here", end=True)
    assert eventually(lambda: b"".join(got) == b"still here")


def test_a_client_reset_closes_the_upstream(make_proxy, raw_upstream):
    closed: list[bool] = []

    def wait_for_close(conn: RawConn) -> None:
        try:
            while conn.sock.recv(65536):
                pass
        except OSError:
            pass
        closed.append(True)

    up = raw_upstream(raw_ws(wait_for_close))
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, _ = _open(client)
    client.conn.reset_stream(sid)
    client.flush()
    assert eventually(lambda: closed == [True])
    assert client.response(client.request("/other"))[0] == 200  # the connection goes on


def test_an_upstream_reset_resets_the_stream(make_proxy, raw_upstream):
    def reset(conn: RawConn) -> None:
        conn.sock.recv(10)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()

    up = raw_upstream(raw_ws(reset))
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, _ = _open(client)
    client.send(sid, b"ping")
    assert client.until(lambda: bool(client.of(sid, h2.events.StreamReset)))


def test_the_tunnel_counts_and_is_logged_with_http_version_2(make_proxy, ws_upstream, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, _ = _open(client, "/counted")
    ws = WsOverH2(client, sid)
    ws.send("a")
    assert ws.recv() == "a"
    assert proxy.telemetry.tunnels_active == 1
    client.send(sid, ws.ws.send(__import__("wsproto").events.CloseConnection(code=1000)))
    client.send(sid, b"", end=True)
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0)
    assert eventually(lambda: access_records(caplog, "tunnel"))
    (line,) = access_records(caplog, "tunnel")
    assert line["http_version"] == "2"
    assert line["protocol"] == "websocket"
    assert line["path"] == "/counted"
    assert line["bytes_in"] > 0
    assert line["first_close"] in ("client", "upstream")
    (http_line,) = [r for r in access_records(caplog) if r["path"] == "/counted"]
    assert (http_line["method"], http_line["status"], http_line["http_version"]) == (
        "CONNECT",
        200,
        "2",
    )


def test_an_idle_tunnel_times_out(make_proxy, raw_upstream, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = raw_upstream(echo_after_switch())
    up = raw_upstream(raw_ws(lambda conn: conn.read_until_close(30)))
    proxy = make_proxy(h2_yaml(up.port, timeouts={"tunnel_idle": 0.3}))
    client = H2Peer(proxy.address)
    sid, _ = _open(client)
    assert client.until(lambda: client.finished(sid))
    assert eventually(lambda: access_records(caplog, "tunnel"))
    assert access_records(caplog, "tunnel")[0]["first_close"] == "idle"


def test_a_stalled_tunnel_does_not_affect_the_connections_other_streams(make_proxy, ws_upstream):
    """Per-stream windows: a tunnel whose client stops reading holds back its own upstream,
    while a second tunnel and plain requests on the same connection go on."""

    async def flood(ws) -> None:
        await ws.recv()
        chunk = b"x" * 65536
        for _ in range(200):  # 12.5 MiB: far more than the stream's window
            await ws.send(chunk)

    stalled_up = ws_upstream(flood)
    echo_up = ws_upstream()
    proxy = make_proxy(
        config_yaml({"flood": stalled_up.port, "echo": echo_up.port},
                    [route("flood", path_prefix="/flood"), route("echo")],
                    listen=listener(http2=True))
    )  # fmt: skip
    client = H2Peer(proxy.address)
    stalled, _ = _open(client, "/flood")
    client.no_ack.add(stalled)
    WsOverH2(client, stalled).send("go")
    assert client.until(lambda: len(client.data(stalled)) >= 65535)
    sid, _ = _open(client, "/echo")
    ws = WsOverH2(client, sid)
    for i in range(20):
        ws.send(f"m{i}" * 1000)
        assert ws.recv() == f"m{i}" * 1000
    assert client.response(client.request("/plain"))[0] == 426  # websockets' answer to GET
    assert len(client.data(stalled)) == 65535


def test_the_clients_window_opens_only_as_the_upstream_takes_bytes(make_proxy, raw_upstream):
    """An upstream that stops reading shuts the client's window for the stream (after the
    kernel's buffers are full), and every byte arrives, in order, once it reads again."""
    import threading

    total = 8 << 20
    reading = threading.Event()
    got = bytearray()

    def slow_reader(conn: RawConn) -> None:
        # A small receive buffer: the kernel's own buffering must not hide the proxy's.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        reading.wait(30)
        while len(got) < total and (data := conn.sock.recv(1 << 20)):
            got.extend(data)

    up = raw_upstream(raw_ws(slow_reader))
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    sid, head = _open(client)
    assert head[b":status"] == b"200"
    payload = bytes(range(256)) * (total // 256)
    sent = 0
    stalled = False
    while sent < total and not stalled:
        window = min(client.conn.local_flow_control_window(sid), total - sent)
        if window > 0:
            while window > 0:  # all the window allows, in one write
                n = min(window, client.conn.max_outbound_frame_size)
                client.conn.send_data(sid, payload[sent : sent + n])
                sent += n
                window -= n
            client.flush()
            client.pump(0.05)  # the proxy's WINDOW_UPDATEs, if any came
            continue
        # Shut: a PING round trip shows the proxy has read everything sent so far and
        # still credits nothing.
        client.conn.ping(b"sentinel")
        client.flush()
        acks = len([e for e in client.events if isinstance(e, h2.events.PingAckReceived)])
        assert client.until(
            lambda acks=acks: len(
                [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
            )
            > acks
        )
        stalled = client.conn.local_flow_control_window(sid) <= 0
    assert stalled
    assert sent < total
    reading.set()
    client.send(sid, payload[sent:])
    assert eventually(lambda: len(got) == total, timeout=30)
    assert bytes(got) == payload
