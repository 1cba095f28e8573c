"""The demo's built-in upstream: the demo page at `/` and a WebSocket echo/chat room at `/ws`.

h11 parses the HTTP side and answers the upgrade itself; after the 101, wsproto speaks the
frames. Each WebSocket first gets a `handshake` message listing the request head exactly as
this upstream received it (so the page can show what the proxy rewrote), then an `echo` of
each text message it sends; other open sockets get it as `chat`. Bad input closes that one
connection and never the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Final

import h11
import trio
import wsproto
import wsproto.utilities
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)

from upgradeproxy.transport.streams import (
    MAX_RECV,
    STREAM_ERRORS,
    HttpStream,
    PeerClosed,
    aclose_quietly,
)

log = logging.getLogger("upgradeproxy.demo.main")

HEAD_TIMEOUT: Final = 10.0  # a request head, or keep-alive idle (outlives the proxy's 4 s pool)
WS_IDLE_TIMEOUT: Final = 3600.0
MAX_MESSAGE: Final = 64 * 1024  # bigger messages close the socket with 1009 (RFC 6455 §7.4.1)
CHAT_BACKLOG: Final = 32  # chat lines queued for a slow reader before it misses some
WS_PATH: Final = b"/ws"

# Everything a misbehaving peer can make this server raise; each ends that connection only.
_PEER_ERRORS: Final = (
    h11.ProtocolError,
    wsproto.utilities.ProtocolError,
    PeerClosed,
    trio.TooSlowError,
    UnicodeError,
    *STREAM_ERRORS,
)


def demo_page() -> bytes:
    """The demo page, from the package data."""
    return (files("upgradeproxy.demo") / "static" / "demo.html").read_bytes()


def websocket_key(request: h11.Request) -> bytes | None:
    """The `Sec-WebSocket-Key` of a valid RFC 6455 §4.2.1 opening handshake, else None."""
    headers = {name: value for name, value in request.headers}  # h11 lower-cases names
    tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
    if request.method != b"GET" or b"upgrade" not in tokens:
        return None
    if headers.get(b"upgrade", b"").strip().lower() != b"websocket":
        return None
    if headers.get(b"sec-websocket-version", b"").strip() != b"13":
        return None
    key = headers.get(b"sec-websocket-key", b"").strip()
    return key or None


def handshake_message(request: h11.Request) -> str:
    """The first message on each socket: the request head as this upstream received it."""
    raw = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in
           request.headers.raw_items()]  # fmt: skip
    line = f"{request.method.decode()} {request.target.decode('latin-1')} HTTP/1.1"
    return json.dumps({"type": "handshake", "request_line": line, "headers": raw})


class _Peer:
    """One open WebSocket: its frames, its stream, and its queue of chat lines."""

    def __init__(self, ident: int, stream: trio.abc.Stream, ws: Connection) -> None:
        self.ident = ident
        self.stream = stream
        self.ws = ws
        self.lock = trio.Lock()
        self.inbox, self.outbox = trio.open_memory_channel[str](CHAT_BACKLOG)

    async def send(self, event: Event) -> None:
        """Frame and write `event`; the lock keeps concurrent writers from interleaving."""
        async with self.lock:
            if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                await self.stream.send_all(self.ws.send(event))


@dataclass
class ChatRoom:
    """Every open WebSocket, so a message can reach the others."""

    peers: dict[int, _Peer] = field(default_factory=dict)
    next_id: int = 1

    def broadcast(self, sender: _Peer, text: str) -> None:
        """Queue `text` for every other peer; a full queue (slow reader) misses this line."""
        line = json.dumps({"type": "chat", "from": sender.ident, "text": text})
        for peer in self.peers.values():
            if peer is not sender:
                with contextlib.suppress(trio.WouldBlock):
                    peer.inbox.send_nowait(line)


async def serve_upstream(
    *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the page and `/ws` on 127.0.0.1 (ephemeral port) until cancelled."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[:2])
    page, room = demo_page(), ChatRoom()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_connection(stream, page, room)

    await trio.serve_listeners(handler, listeners)


async def serve_connection(stream: trio.abc.Stream, page: bytes, room: ChatRoom) -> None:
    """One client connection: HTTP keep-alive until it closes or switches to WebSocket."""
    http = HttpStream(h11.Connection(h11.SERVER), stream)
    try:
        while (request := await _read_request(http)) is not None:
            key = websocket_key(request) if request.target == WS_PATH else None
            if key is not None:
                await _switch(http, key)
                await _serve_websocket(stream, request, http.h11.trailing_data[0], room)
                return
            await _respond(http, request, page)
            if http.h11.our_state is not h11.DONE or http.h11.their_state is not h11.DONE:
                return
            http.h11.start_next_cycle()
    except* _PEER_ERRORS as group:
        log.debug("demo upstream: closing a connection: %s", group.exceptions[0])
    except* Exception:
        # A bug in the demo must cost one connection, never the demo.
        log.exception("demo upstream: unexpected error")
    finally:
        await aclose_quietly(stream)


async def _read_request(http: HttpStream) -> h11.Request | None:
    """The next request, its body (if any) read and dropped; None when the client is done."""
    try:
        with trio.fail_after(HEAD_TIMEOUT):
            event = await http.next_event()
            if not isinstance(event, h11.Request):
                return None
            request = event
            while not isinstance(event, h11.EndOfMessage):
                event = await http.next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return None
    except h11.RemoteProtocolError as exc:
        await _send_error(http, exc.error_status_hint)
        return None
    return request


async def _send_error(http: HttpStream, status: int) -> None:
    """Answer a malformed request (h11 says how bad) if a response can still be sent."""
    if http.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = b"%d bad request\n" % status
    headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"%d" % len(body)),
               (b"Connection", b"close")]  # fmt: skip
    await http.send(h11.Response(status_code=status, headers=headers))
    await http.send(h11.Data(data=body))
    await http.send(h11.EndOfMessage())


async def _switch(http: HttpStream, key: bytes) -> None:
    """Accept the upgrade with a 101 (RFC 6455 §4.2.2); h11 hands over the bytes behind it."""
    accept = wsproto.utilities.generate_accept_token(key)
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
               (b"Sec-WebSocket-Accept", accept)]  # fmt: skip
    await http.send(
        h11.InformationalResponse(status_code=101, headers=headers, reason=b"Switching Protocols")
    )


async def _respond(http: HttpStream, request: h11.Request, page: bytes) -> None:
    """The page at `/`, 404 elsewhere, 400 for a broken WebSocket handshake."""
    path = request.target.split(b"?", 1)[0]
    if request.method not in (b"GET", b"HEAD"):
        status, ctype, body = 405, b"text/plain", b"method not allowed\n"
    elif path == WS_PATH:
        status, ctype, body = 400, b"text/plain", b"expected a WebSocket handshake\n"
    elif path in (b"/", b"/index.html"):
        status, ctype, body = 200, b"text/html; charset=utf-8", page
    else:
        status, ctype, body = 404, b"text/plain", b"not found\n"
    headers = [(b"Content-Type", ctype), (b"Content-Length", str(len(body)).encode()),
               (b"Cache-Control", b"no-store")]  # fmt: skip
    await http.send(h11.Response(status_code=status, headers=headers))
    if request.method != b"HEAD":
        await http.send(h11.Data(data=body))
    await http.send(h11.EndOfMessage())


async def _serve_websocket(
    stream: trio.abc.Stream, request: h11.Request, trailing: bytes, room: ChatRoom
) -> None:
    """Send the handshake report, then echo and relay messages until either side closes."""
    peer = _Peer(room.next_id, stream, Connection(ConnectionType.SERVER, trailing_data=trailing))
    room.next_id += 1
    room.peers[peer.ident] = peer
    try:
        await peer.send(TextMessage(handshake_message(request)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_chat, peer, name=f"demo ws {peer.ident} chat")
            await _read_frames(peer, room)
            nursery.cancel_scope.cancel()
    finally:
        del room.peers[peer.ident]


async def _write_chat(peer: _Peer) -> None:
    async for line in peer.outbox:
        await peer.send(TextMessage(line))


async def _read_frames(peer: _Peer, room: ChatRoom) -> None:
    """Handle the peer's frames until the close handshake (or EOF) ends the socket."""
    text: list[str] = []
    binary: list[bytes] = []
    while True:
        for event in peer.ws.events():
            if isinstance(event, CloseConnection):
                await peer.send(event.response())
                return
            if isinstance(event, Ping):
                await peer.send(event.response())
            elif isinstance(event, TextMessage):
                text.append(event.data)
            elif isinstance(event, BytesMessage):
                binary.append(bytes(event.data))
            if sum(map(len, text)) + sum(map(len, binary)) > MAX_MESSAGE:
                await peer.send(CloseConnection(1009, "message too big"))
                return
            if isinstance(event, Message) and event.message_finished:
                await _answer(peer, room, "".join(text), b"".join(binary))
                text, binary = [], []
        with trio.fail_after(WS_IDLE_TIMEOUT):
            data = await peer.stream.receive_some(MAX_RECV)
        peer.ws.receive_data(bytes(data) if data else None)


async def _answer(peer: _Peer, room: ChatRoom, text: str, binary: bytes) -> None:
    """Echo a finished message to its sender, and share a text message with the room."""
    if binary:
        await peer.send(BytesMessage(binary))  # binary frames are echoed, not shared
        return
    await peer.send(TextMessage(json.dumps({"type": "echo", "text": text})))
    room.broadcast(peer, text)
