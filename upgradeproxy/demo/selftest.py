"""`upgradeproxy demo --selftest`'s client: one scripted WebSocket round trip through the
demo's proxy, printing both heads, what the upstream received (marking what the proxy
changed) and the echo. Any surprise raises `SelftestFailed` with the reason.
"""

from __future__ import annotations

import json
from typing import Final, TextIO

import h11
import trio
import wsproto.utilities
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from upgradeproxy import __version__
from upgradeproxy.transport.streams import MAX_RECV

SELFTEST_MESSAGE: Final = "hello upgradeproxy"
# Headers the page and the selftest point out: what the proxy rewrites or adds on the way.
REWRITTEN: Final = frozenset({"connection", "upgrade"})
ADDED: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id"}
)


class SelftestFailed(Exception):
    """The round trip went wrong; the message says how."""


async def round_trip(address: tuple[str, int], out: TextIO) -> None:
    """Handshake through the proxy, check the 101, send a message and await its echo."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        key = wsproto.utilities.generate_nonce()
        http = h11.Connection(h11.CLIENT)
        head = http.send(_handshake_request(address, key))
        _show(out, ">>> request head sent to the proxy", head)
        await stream.send_all(head)
        response, raw = await _read_response(stream, http)
        _show(out, "<<< response head from the proxy", raw)
        check_switch(response, key)
        print("Sec-WebSocket-Accept matches the key: ok\n", file=out)
        ws = Connection(ConnectionType.CLIENT, trailing_data=http.trailing_data[0])
        _show_upstream_view(out, await _next_text(stream, ws))
        await stream.send_all(ws.send(TextMessage(SELFTEST_MESSAGE)))
        print(f">>> sent    {SELFTEST_MESSAGE!r}", file=out)
        echo = json.loads(await _next_text(stream, ws))
        if echo != {"type": "echo", "text": SELFTEST_MESSAGE}:
            raise SelftestFailed(f"expected the echo of {SELFTEST_MESSAGE!r}, got {echo!r}")
        print(f"<<< echoed  {echo['text']!r}\n", file=out)
        await stream.send_all(ws.send(CloseConnection(1000, "selftest done")))
        await _next_text(stream, ws, closing=True)


def _handshake_request(address: tuple[str, int], key: bytes) -> h11.Request:
    headers = [
        ("Host", f"{address[0]}:{address[1]}"),
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", key.decode()),
        ("Sec-WebSocket-Version", "13"),
        ("User-Agent", f"upgradeproxy-selftest/{__version__}"),
    ]
    return h11.Request(method="GET", target="/ws", headers=headers)


async def _read_response(
    stream: trio.abc.Stream, http: h11.Connection
) -> tuple[h11.InformationalResponse, bytes]:
    """The 101 and its raw head; any other answer fails the test."""
    raw = b""
    while (event := http.next_event()) is h11.NEED_DATA:
        data = bytes(await stream.receive_some(MAX_RECV))
        raw += data
        http.receive_data(data)
    head = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    if isinstance(event, h11.ConnectionClosed):
        raise SelftestFailed("the proxy closed the connection without an answer")
    if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
        status = getattr(event, "status_code", "?")
        raise SelftestFailed(f"expected 101 Switching Protocols, got {status}:\n{head.decode()}")
    return event, head


def check_switch(response: h11.InformationalResponse, key: bytes) -> None:
    """RFC 6455 §4.1: the 101 must name `websocket` and carry the accept token for `key`."""
    headers = dict(response.headers)
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        raise SelftestFailed(f"101 without 'Upgrade: websocket': {headers.get(b'upgrade')!r}")
    expected = wsproto.utilities.generate_accept_token(key)
    if headers.get(b"sec-websocket-accept") != expected:
        found = headers.get(b"sec-websocket-accept")
        raise SelftestFailed(f"bad Sec-WebSocket-Accept {found!r}, expected {expected!r}")


async def _next_text(stream: trio.abc.Stream, ws: Connection, *, closing: bool = False) -> str:
    """The next whole text message; with `closing`, wait for the close reply instead."""
    parts: list[str] = []
    while True:
        for event in ws.events():
            if isinstance(event, CloseConnection):
                if closing:
                    return ""
                raise SelftestFailed(f"the WebSocket closed: {event.code} {event.reason or ''}")
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished and not closing:
                    return "".join(parts)
        data = await stream.receive_some(MAX_RECV)
        ws.receive_data(bytes(data) if data else None)


def _show(out: TextIO, title: str, raw: bytes) -> None:
    text = raw.decode("latin-1").replace("\r\n", "\n").rstrip("\n")
    print(f"{title}\n{text}\n", file=out)


def _show_upstream_view(out: TextIO, message: str) -> None:
    """Print the request head the upstream received, marking what the proxy changed."""
    report = json.loads(message)
    if report.get("type") != "handshake":
        raise SelftestFailed(f"expected the upstream's handshake report, got {message!r}")
    print("--- request head the upstream received (via the proxy)", file=out)
    print(report["request_line"], file=out)
    for name, value in report["headers"]:
        note = _note(name.lower())
        print(f"{name}: {value}" + (f"    <- {note}" if note else ""), file=out)
    print(file=out)


def _note(name: str) -> str:
    if name in REWRITTEN:
        return "hop-by-hop, rebuilt by the proxy"
    if name in ADDED:
        return "added by the proxy"
    if name.startswith("sec-websocket-"):
        return "end-to-end, passed through"
    return ""
