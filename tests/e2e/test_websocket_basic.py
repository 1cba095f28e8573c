"""WebSocket round trips through the proxy with the `websockets` library on both ends."""

from __future__ import annotations

from websockets.sync.client import connect

from tests.conftest import proxy_yaml


def test_text_and_binary_echo(make_proxy, ws_upstream):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/chat")) as ws:
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send(b"\x00\x01\xff")
        assert ws.recv() == b"\x00\x01\xff"
    assert up.requests[0].path == "/chat"
