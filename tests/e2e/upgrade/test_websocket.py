"""WebSocket through the proxy with the `websockets` library on both sides (a sync client here,
the asyncio server in `ws_upstream`): what an application sees, messages, pings, close codes,
subprotocols and extensions, fifty clients at once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import connect

from tests.support.configs import proxy_yaml
from tests.support.waiting import WAIT, eventually

MiB = 1 << 20


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
