"""WebSocket and raw upgraded tunnels through the proxy, seen from both ends.

Two kinds of peers:

* the `websockets` library on both sides (sync client here, asyncio server in `ws_upstream`),
  for what a real application sees: messages, pings, close codes, subprotocols, extensions and
  the handshake headers that reach the upstream;
* raw sockets on both sides of an upgraded connection (a hand-written handshake, then plain
  bytes), for what the tunnel itself must guarantee: every byte, in order, half-closes, the idle
  timeout and the byte counters.

Every wait is bounded; nothing asserts how long something took.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import connect

from tests.support.clients import Tunnel, read_until_close, readable
from tests.support.configs import proxy_yaml
from tests.support.peers import RawConn, accept_upgrade
from tests.support.waiting import WAIT, eventually

MiB = 1 << 20
# --- helpers ---------------------------------------------------------------------------


def open_raw_tunnel(address: tuple[str, int]) -> tuple[socket.socket, bytes]:
    """Client side: a valid WebSocket handshake; the socket (timeout `WAIT`) and any tunnel
    bytes that arrived with the 101 head."""
    tunnel = Tunnel(address, "/tunnel")
    assert tunnel.status == 101, tunnel.head
    return tunnel.sock, bytes(tunnel.buf)


class HashingReader:
    """Reads a socket to EOF, keeping only a running sha256 and a byte count."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.sha.update(data)
        self.total += len(data)

    def read_to_eof(self, sock: socket.socket) -> None:
        while data := sock.recv(1 << 18):
            self.feed(data)


def send_then_fin(sock: socket.socket, payload: bytes, errors: list[BaseException]) -> None:
    """Write `payload` in 1 MiB slices, then half-close; errors are collected, not lost."""
    try:
        view = memoryview(payload)
        for i in range(0, len(view), MiB):
            sock.sendall(view[i : i + MiB])
        sock.shutdown(socket.SHUT_WR)
    except BaseException as exc:
        errors.append(exc)


# --- messages --------------------------------------------------------------------------


def test_text_and_binary_echo(make_proxy, ws_upstream):
    """A text and a binary message each make the round trip unchanged, on the requested path."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/chat"), open_timeout=WAIT) as ws:
        ws.send("hello, ünïcode ✓")
        assert ws.recv(timeout=WAIT) == "hello, ünïcode ✓"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=WAIT) == b"\x00\x01\xff"
    assert up.requests[0].path == "/chat"


def test_one_mebibyte_messages_each_way(make_proxy, ws_upstream):
    """A 1 MiB binary and a 1 MiB text message go up and come back down byte for byte."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    blob = os.urandom(MiB)
    text = ("0123456789abcdef" * (MiB // 16))[:MiB]
    with connect(proxy.url("/big"), open_timeout=WAIT, max_size=None) as ws:
        ws.send(blob)
        echoed = ws.recv(timeout=WAIT)
        assert len(echoed) == MiB
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
        ws.send(text)
        assert ws.recv(timeout=WAIT) == text


def test_many_small_messages_keep_their_order(make_proxy, ws_upstream):
    """Rule 5: "Bytes are never reordered, duplicated or dropped": 1000 pipelined messages
    come back exactly once each, in the order they were sent."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    sent = [f"message {i}" for i in range(1000)]
    with connect(proxy.url("/many"), open_timeout=WAIT) as ws:
        for message in sent:
            ws.send(message)
        received = [ws.recv(timeout=WAIT) for _ in sent]
    assert received == sent


# --- control frames --------------------------------------------------------------------


def test_client_ping_gets_pong(make_proxy, ws_upstream):
    """A ping from the client reaches the upstream and its pong (same payload) comes back."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/ping"), open_timeout=WAIT, ping_interval=None) as ws:
        pong = ws.ping(b"from-client")
        assert pong.wait(WAIT), "no pong for the client's ping"
        ws.send("still open")
        assert ws.recv(timeout=WAIT) == "still open"


def test_upstream_ping_gets_pong(make_proxy, ws_upstream):
    """A ping the upstream starts reaches the client, and the client's pong reaches the upstream."""

    async def handler(ws):
        pong = await ws.ping(b"from-upstream")
        await asyncio.wait_for(pong, WAIT)
        await ws.send("pong received")
        async for _ in ws:
            pass

    up = ws_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/ping"), open_timeout=WAIT, ping_interval=None) as ws:
        assert ws.recv(timeout=WAIT) == "pong received"


def test_client_close_code_and_reason_reach_upstream(make_proxy, ws_upstream):
    """The client's close frame (4001 "bye") reaches the upstream as sent, and the upstream's
    answering close frame reaches the client."""
    seen: queue.Queue[tuple[int, str] | None] = queue.Queue()

    async def handler(ws):
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            seen.put((rcvd.code, rcvd.reason) if rcvd is not None else None)
        else:
            seen.put(None)  # the iteration ended without the client's close frame

    up = ws_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/close"), open_timeout=WAIT, close_timeout=WAIT) as ws:
        ws.send("hi")
        assert ws.recv(timeout=WAIT) == "hi"
        ws.close(4001, "bye")
        assert seen.get(timeout=WAIT) == (4001, "bye")
        assert ws.close_code == 4001  # the upstream echoed the code back through the proxy


def test_upstream_close_code_and_reason_reach_client(make_proxy, ws_upstream):
    """The upstream's close frame (4002 "server done") reaches the client as sent, and the
    client's answering close frame reaches the upstream (the closing handshake completes)."""
    upstream_got: queue.Queue[tuple[int, str] | None] = queue.Queue()

    async def handler(ws):
        await ws.close(4002, "server done")
        rcvd = ws.protocol.close_rcvd
        upstream_got.put((rcvd.code, rcvd.reason) if rcvd is not None else None)

    up = ws_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/close"), open_timeout=WAIT) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=WAIT)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4002, "server done")
    assert upstream_got.get(timeout=WAIT) == (4002, "server done")


# --- negotiation -----------------------------------------------------------------------


def test_subprotocol_negotiated_end_to_end(make_proxy, ws_upstream):
    """Rule 1: `Sec-WebSocket-*` headers go upstream unchanged, and rule 2: the 101 is relayed
    with its end-to-end headers, so the upstream's choice of subprotocol is the client's."""
    up = ws_upstream(subprotocols=["chat.v1", "chat.v2"])  # the server prefers chat.v1
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/sub"), open_timeout=WAIT, subprotocols=["chat.v2", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
        ws.send("on chat.v1")
        assert ws.recv(timeout=WAIT) == "on chat.v1"
        offered = ws.request.headers.get_all("Sec-WebSocket-Protocol")
    assert offered == ["chat.v2, chat.v1"]
    assert up.requests[0].headers.get_all("Sec-WebSocket-Protocol") == offered


def test_permessage_deflate_negotiated_end_to_end(make_proxy, ws_upstream):
    """The client's `Sec-WebSocket-Extensions` offer reaches the upstream unchanged, the
    upstream's acceptance reaches the client, and compressed frames (RSV1 set) pass intact."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    text = "compress me " * 10_000
    with connect(proxy.url("/deflate"), open_timeout=WAIT) as ws:
        assert any(isinstance(ext, PerMessageDeflate) for ext in ws.protocol.extensions)
        ws.send(text)
        assert ws.recv(timeout=WAIT) == text
        offer = ws.request.headers.get_all("Sec-WebSocket-Extensions")
    assert len(offer) == 1
    assert offer[0].startswith("permessage-deflate")
    assert up.requests[0].headers.get_all("Sec-WebSocket-Extensions") == offer


def test_no_compression_when_client_does_not_offer_it(make_proxy, ws_upstream):
    """A client that offers no extension gets none: the proxy adds no Sec-WebSocket-Extensions."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    text = "plain " * 1000
    with connect(proxy.url("/plain"), open_timeout=WAIT, compression=None) as ws:
        assert ws.protocol.extensions == []
        ws.send(text)
        assert ws.recv(timeout=WAIT) == text
    assert "Sec-WebSocket-Extensions" not in up.requests[0].headers


# --- the handshake the upstream sees ---------------------------------------------------


def test_upstream_sees_end_to_end_and_forwarding_headers(make_proxy, ws_upstream):
    """Rule 1: the request "goes upstream with `Connection: upgrade` and an `Upgrade` header
    holding only the protocols the route allows ... with every end-to-end header
    (`Sec-WebSocket-*`, `Origin`, `Cookie`, `Authorization`, ...) unchanged"; rule 4: the proxy
    adds `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    extra = {"Cookie": "session=abc123; theme=dark", "Authorization": "Bearer s3cr3t.t0ken"}
    with connect(
        proxy.url("/headers?x=1"),
        open_timeout=WAIT,
        origin="http://app.example",
        additional_headers=extra,
    ) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "x"
        sent = ws.request.headers
    got = up.requests[0]
    assert got.path == "/headers?x=1"
    for name in ("Origin", "Cookie", "Authorization", "Sec-WebSocket-Key", "Sec-WebSocket-Version"):
        assert got.headers.get_all(name) == sent.get_all(name), name
    assert got.headers["Origin"] == "http://app.example"
    assert got.headers["Cookie"] == "session=abc123; theme=dark"
    assert got.headers["Authorization"] == "Bearer s3cr3t.t0ken"
    assert got.headers.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert got.headers.get_all("X-Forwarded-Proto") == ["http"]
    assert got.headers.get_all("X-Forwarded-Host") == [sent["Host"]]
    assert "upgradeproxy" in got.headers["Via"]
    assert [v.lower() for v in got.headers.get_all("Connection")] == ["upgrade"]
    assert [v.lower() for v in got.headers.get_all("Upgrade")] == ["websocket"]


def test_client_supplied_forwarding_headers_are_replaced(make_proxy, ws_upstream):
    """Rule 4: "Client-supplied ones are replaced, unless the peer is in `trusted_proxies`"
    (it is not here): a client cannot spoof its address, scheme or host to the upstream."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    spoofed = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
    }
    with connect(proxy.url("/"), open_timeout=WAIT, additional_headers=spoofed) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "x"
        host = ws.request.headers["Host"]
    got = up.requests[0].headers
    assert got.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert got.get_all("X-Forwarded-Proto") == ["http"]
    assert got.get_all("X-Forwarded-Host") == [host]


# --- the raw tunnel --------------------------------------------------------------------


def test_32_mib_each_way_at_once_through_raw_tunnel(make_proxy, raw_upstream):
    """Rule 5: "Bytes are never reordered, duplicated or dropped", with both directions busy at
    once: 32 MiB up and 32 MiB down concurrently, checked by exact count and sha256 on arrival,
    each side ending with a FIN."""
    size = 32 * MiB
    up_payload, down_payload = os.urandom(size), os.urandom(size)
    at_upstream = HashingReader()
    upstream_errors: list[BaseException] = []
    upstream_done = threading.Event()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            writer = threading.Thread(
                target=send_then_fin, args=(conn.sock, down_payload, upstream_errors)
            )
            writer.start()
            at_upstream.feed(bytes(conn.received))
            conn.received.clear()
            at_upstream.read_to_eof(conn.sock)
            writer.join(WAIT * 3)
        except BaseException as exc:
            upstream_errors.append(exc)
        finally:
            upstream_done.set()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    sock, rest = open_raw_tunnel(proxy.address)
    client_errors: list[BaseException] = []
    writer = threading.Thread(target=send_then_fin, args=(sock, up_payload, client_errors))
    writer.start()
    at_client = HashingReader()
    at_client.feed(rest)
    try:
        at_client.read_to_eof(sock)
    finally:
        writer.join(WAIT * 3)
        sock.close()
    assert upstream_done.wait(WAIT * 3)
    assert not client_errors, client_errors
    assert not upstream_errors, upstream_errors
    assert at_upstream.total == size
    assert at_client.total == size
    assert at_upstream.sha.digest() == hashlib.sha256(up_payload).digest()
    assert at_client.sha.digest() == hashlib.sha256(down_payload).digest()


def test_client_half_close_keeps_the_way_back_open(make_proxy, raw_upstream):
    """Rule 5: "Half-closes are propagated (a FIN one way does not cut the other way)": after the
    client's FIN the upstream reads every byte then EOF, and its later reply still reaches the
    client, followed by EOF when the upstream closes."""
    payload = os.urandom(256 * 1024) + b"the end"
    reply = b"reply sent after your FIN"
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
            conn.send(reply)
        except BaseException as exc:
            at_upstream.put(exc)
        finally:
            conn.close()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    sock, rest = open_raw_tunnel(proxy.address)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert at_upstream.get(timeout=WAIT) == payload
        assert read_until_close(sock, rest) == reply


def test_upstream_half_close_keeps_the_way_up_open(make_proxy, raw_upstream):
    """Rule 5, the mirror case: after the upstream's FIN the client reads its bytes then EOF, yet
    what the client sends afterwards still reaches the upstream in full."""
    greeting = b"server says bye, but keeps listening"
    payload = os.urandom(256 * 1024) + b"the end"
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            conn.send(greeting)
            conn.sock.shutdown(socket.SHUT_WR)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
        except BaseException as exc:
            at_upstream.put(exc)
        finally:
            conn.close()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    sock, rest = open_raw_tunnel(proxy.address)
    with sock:
        assert read_until_close(sock, rest) == greeting
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert at_upstream.get(timeout=WAIT) == payload


def test_idle_tunnel_is_closed_on_both_sides(make_proxy, raw_upstream):
    """Rule 5: "when ... `tunnel_idle` passes with no bytes, both sockets close"."""
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
        except BaseException as exc:
            at_upstream.put(exc)

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port, timeouts={"tunnel_idle": "300ms"}))
    sock, rest = open_raw_tunnel(proxy.address)
    with sock:
        assert rest == b""
        assert sock.recv(65536) == b"", "the proxy should close the idle client side"
    assert at_upstream.get(timeout=WAIT) == b"", "the proxy should close the idle upstream side"
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0)


@pytest.mark.parametrize("traffic", ["echo", "client-only", "upstream-only"])
def test_tunnel_with_traffic_stays_open_past_idle_timeout(make_proxy, raw_upstream, traffic):
    """Rule 5: the tunnel closes only when `tunnel_idle` passes "with no bytes either way":
    bytes flowing in either or both directions keep it open. Until when: a quiet tunnel
    opened just after it (the sentinel) has been closed for being idle."""
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()
    stop = threading.Event()  # upstream-only: stop sending

    def handler(conn: RawConn) -> None:
        try:
            head = accept_upgrade(conn)
            if head.startswith(b"GET /quiet "):
                at_upstream.put(conn.read_until_close(timeout=WAIT))
                return
            if traffic == "echo":
                while (byte := conn.read_exactly(1, timeout=WAIT)) != b"!":
                    conn.send(byte)
            elif traffic == "client-only":
                got = bytearray()
                while (byte := conn.read_exactly(1, timeout=WAIT)) != b"!":
                    got += byte
                at_upstream.put(bytes(got))
            else:
                while not stop.is_set():
                    conn.send(b"d")
            conn.send(b"still here")
            at_upstream.put(conn.read_exactly(4, timeout=WAIT))
        except BaseException as exc:
            at_upstream.put(exc)

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port, timeouts={"tunnel_idle": 1}))
    busy = Tunnel(proxy.address, "/busy")
    quiet = Tunnel(proxy.address, "/quiet")
    sent = 0
    with busy.sock as sock, quiet.sock:
        while not readable(quiet.sock):  # bytes flow until the quiet tunnel is closed
            if traffic == "echo":
                assert busy.echo(b"u") == b"u"
            elif traffic == "client-only":
                sock.sendall(b"u")
                sent += 1
            else:
                assert busy.recv(1) == b"d"
        assert at_upstream.get(timeout=WAIT) == b""  # the quiet one, closed both ways
        if traffic != "upstream-only":
            sock.sendall(b"!")
        if traffic == "client-only":
            assert at_upstream.get(timeout=WAIT) == b"u" * sent
        stop.set()
        assert busy.recv_until(b"still here").strip(b"d") == b""
        sock.sendall(b"ack!")
        assert at_upstream.get(timeout=WAIT) == b"ack!"


def test_tunnel_metrics_count_bytes_and_active_tunnels(make_proxy, raw_upstream):
    """`upgradeproxy_tunnels_active` counts the open tunnel and returns to 0 once it closes;
    `upgradeproxy_tunnel_bytes_total{direction}` counts exactly the bytes relayed each way (the
    handshake itself is HTTP, not tunnel bytes)."""
    up_bytes, down_bytes = 100_000, 70_000
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
            conn.send(b"d" * down_bytes)
        except BaseException as exc:
            at_upstream.put(exc)
        finally:
            conn.close()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    telemetry = proxy.telemetry
    sock, rest = open_raw_tunnel(proxy.address)
    with sock:
        assert eventually(lambda: telemetry.tunnels_active == 1)
        sock.sendall(b"u" * up_bytes)
        sock.shutdown(socket.SHUT_WR)
        assert at_upstream.get(timeout=WAIT) == b"u" * up_bytes
        assert read_until_close(sock, rest) == b"d" * down_bytes
    assert eventually(lambda: telemetry.tunnels_active == 0), telemetry.tunnels_active
    expected = {"up": up_bytes, "down": down_bytes}
    assert eventually(lambda: telemetry.tunnel_bytes == expected), telemetry.tunnel_bytes


# --- many clients ----------------------------------------------------------------------


def test_fifty_concurrent_websocket_clients(make_proxy, ws_upstream):
    """50 clients at once, 20 echoes each, all on their own tunnel: every message comes back to
    the client that sent it, and every tunnel closes afterwards."""
    clients, echoes = 50, 20
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))

    def client(i: int) -> list[Any]:
        with connect(proxy.url(f"/c{i}"), open_timeout=WAIT * 2) as ws:
            out = []
            for j in range(echoes):
                ws.send(f"client {i} message {j}")
                out.append(ws.recv(timeout=WAIT))
            return out

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(client, range(clients), timeout=WAIT * 4))
    for i, got in enumerate(results):
        assert got == [f"client {i} message {j}" for j in range(echoes)]
    assert sorted(r.path for r in up.requests) == sorted(f"/c{i}" for i in range(clients))
    assert eventually(lambda: proxy.tunnels_active() == 0)
