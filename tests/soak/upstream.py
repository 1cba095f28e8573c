"""The soak's upstream server: WebSocket echo tunnels, a firehose, HTTP bodies; it can reset
connections and restart, and remembers which tunnels it cut so the driver can tell chaos it
caused from a fault of the proxy."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field

import h11
import trio

from tests.support.clients import LOOPBACK
from tests.support.wire import ws_accept

FLOOD_CHUNK = b"f" * 65536


def pattern(size: int) -> bytes:
    """The body `GET /http/<size>` answers with: deterministic, different for every size."""
    return random.Random(size).randbytes(size)


async def reset(stream: trio.SocketStream) -> None:
    """Close with a RST (SO_LINGER 0), as a crashed peer would."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@dataclass(eq=False)
class _Conn:
    stream: trio.SocketStream
    tunnel: str | None = None  # the tunnel id once switched


@dataclass(eq=False)
class Upstream:
    """One upstream server on a fixed loopback port."""

    name: str
    port: int = 0
    conns: set[_Conn] = field(default_factory=set)
    victims: set[str] = field(default_factory=set)  # tunnel ids this server cut on purpose
    restarting: bool = False
    _listeners: list[trio.SocketListener] = field(default_factory=list)
    _scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        self._listeners = await trio.open_tcp_listeners(self.port, host=LOOPBACK)
        self.port = self._listeners[0].socket.getsockname()[1]
        self._scope = trio.CancelScope()
        nursery.start_soon(self._serve, nursery, self._scope)

    async def _serve(self, nursery: trio.Nursery, scope: trio.CancelScope) -> None:
        with scope:
            await trio.serve_listeners(self._handle, self._listeners, handler_nursery=nursery)

    def tunnel_ids(self) -> list[str]:
        return [c.tunnel for c in self.conns if c.tunnel is not None]

    async def reset_tunnel(self, rng: random.Random) -> str | None:
        """Reset one live short echo tunnel (long ones are cut only by the restart); its id."""
        live = [c for c in self.conns if c.tunnel is not None and c.tunnel.startswith("ws-short")]
        if not live:
            return None
        conn = rng.choice(live)
        assert conn.tunnel is not None
        self.victims.add(conn.tunnel)
        await reset(conn.stream)
        return conn.tunnel

    async def restart(self, nursery: trio.Nursery, down_for: float) -> int:
        """Stop listening, reset every connection, come back on the same port; how many cut."""
        self.restarting = True
        assert self._scope is not None
        self._scope.cancel()
        for listener in self._listeners:
            await listener.aclose()
        cut = list(self.conns)
        for conn in cut:
            if conn.tunnel is not None:
                self.victims.add(conn.tunnel)
        for conn in cut:
            await reset(conn.stream)
        await trio.sleep(down_for)
        await self.start(nursery)
        self.restarting = False
        return len(cut)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = _Conn(stream)
        self.conns.add(conn)
        try:
            await self._http(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            pass
        finally:
            self.conns.discard(conn)
            await stream.aclose()

    async def _http(self, conn: _Conn) -> None:
        h = h11.Connection(h11.SERVER)
        while True:
            event = await _next(h, conn.stream)
            if not isinstance(event, h11.Request):
                return
            path = event.target.decode()
            if path.startswith(("/ws/", "/flood/")):
                await self._switch(h, conn, event, path)
                return
            body = bytearray()
            while isinstance(event := await _next(h, conn.stream), h11.Data):
                body += event.data
            if not isinstance(event, h11.EndOfMessage):
                return
            out = bytes(body) if path == "/echo" else pattern(int(path.split("/")[-1]))
            headers = [("Content-Length", str(len(out)))]
            await conn.stream.send_all(
                h.send(h11.Response(status_code=200, headers=headers))
                + h.send(h11.Data(data=out))
                + h.send(h11.EndOfMessage())
            )
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                return
            h.start_next_cycle()

    async def _switch(self, h: h11.Connection, conn: _Conn, req: h11.Request, path: str) -> None:
        key = dict((n.lower(), v) for n, v in req.headers.raw_items()).get(b"sec-websocket-key")
        if key is None:
            return
        await conn.stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + ws_accept(key) + b"\r\n\r\n"
        )
        conn.tunnel = ("ws-" if path.startswith("/ws/") else "flood-") + path.split("/")[-1]
        rest = h.trailing_data[0]
        if path.startswith("/flood/"):
            while True:
                await conn.stream.send_all(FLOOD_CHUNK)
        if rest:
            await conn.stream.send_all(rest)
        while data := await conn.stream.receive_some(65536):
            await conn.stream.send_all(data)
        await conn.stream.send_eof()  # the client's FIN, passed back: the echo is complete


async def _next(h: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while (event := h.next_event()) is h11.NEED_DATA:
        h.receive_data(await stream.receive_some(65536))
    return event  # type: ignore[no-any-return]
