"""Upstream servers the proxy talks to: a `websockets` server, raw-socket servers that see
the exact bytes, and the handlers those run (200 forever, a 101 then an echo, a named pool
member with a switchable health check).

Each peer runs in its own thread(s) so tests stay plain blocking code.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from tests.support.clients import LOOPBACK, Address, Tunnel, http, readable
from tests.support.waiting import WAIT, eventually
from tests.support.wire import header, ok_response, switching

# --- a websockets upstream -------------------------------------------------------------


class WsUpstream:
    """A `websockets` server in an asyncio thread; records each handshake's request. With
    `plain`, a request that is no upgrade is answered 200 with that text."""

    def __init__(
        self, handler: Callable[..., Any] | None = None, plain: str | None = None,
        **serve_kwargs: Any,
    ) -> None:  # fmt: skip
        from websockets.asyncio.server import serve

        self.requests: list[Any] = []
        self._handler = handler or self._echo
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = self._loop.create_future()

            def record(connection: Any, request: Any) -> Any:
                self.requests.append(request)
                if plain is not None and request.headers.get("Upgrade") is None:
                    return connection.respond(HTTPStatus.OK, plain)
                return None

            async with serve(
                self._handler, LOOPBACK, 0, process_request=record, max_size=None, **serve_kwargs
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                self._ready.set()
                await self._stop

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(WAIT):
            raise RuntimeError("websocket upstream did not start")

    @staticmethod
    async def _echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(5)


# --- a raw-socket upstream -------------------------------------------------------------


@dataclass
class RawConn:
    """One accepted upstream connection, with every byte it received."""

    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    heads: list[bytes] = field(default_factory=list)  # every head read_head() returned

    def _fill(self, deadline: float) -> bytes:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        self.received += data
        return data

    def read_head(self, timeout: float = 5) -> bytes:
        """Read until the end of a request head; returns the head (bytes after stay buffered)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.received:
            if not self._fill(deadline):
                raise EOFError("upstream connection closed before a full head")
        end = self.received.index(b"\r\n\r\n") + 4
        head = bytes(self.received[:end])
        del self.received[:end]
        self.heads.append(head)
        return head

    def read_exactly(self, n: int, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if not self._fill(deadline):
                raise EOFError(f"closed after {len(self.received)} of {n} bytes")
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    def read_until_close(self, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            pass
        out = bytes(self.received)
        self.received.clear()
        return out

    def nothing_pending(self) -> bool:
        """No byte beyond what was read has arrived, nor the peer's FIN (a look, no wait)."""
        return not self.received and not readable(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


Handler = Callable[[RawConn], None]


class RawUpstream:
    """A listening socket; each accepted connection is handed to `handler(conn)` in a thread.

    Every connection is kept in `self.conns` so tests can check what reached the upstream.
    """

    def __init__(self, handler: Handler | None = None, host: str = LOOPBACK, port: int = 0) -> None:
        self.host = host
        self.listener = socket.create_server((host, port))
        self.port = int(self.listener.getsockname()[1])
        self.conns: list[RawConn] = []
        self.handler = handler
        self._accepted = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            conn = RawConn(sock)
            with self._accepted:
                self.conns.append(conn)
                self._accepted.notify_all()
            if self.handler is not None:
                threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: RawConn) -> None:
        assert self.handler is not None
        with contextlib.suppress(OSError, EOFError):
            self.handler(conn)

    def accept(self, index: int = -1, timeout: float = 5) -> RawConn:
        """Wait for a connection (the newest, or the `index`-th) and return it."""
        deadline = time.monotonic() + timeout
        with self._accepted:
            while not self.conns or (index >= 0 and len(self.conns) <= index):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no upstream connection")
                self._accepted.wait(left)
            return self.conns[index]

    def all_received(self) -> bytes:
        return b"".join(bytes(c.received) for c in self.conns)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for conn in self.conns:
            conn.close()


# --- handlers for a raw upstream -------------------------------------------------------


def respond_ok_forever(conn: RawConn) -> None:
    """A keep-alive upstream handler answering every bodiless request with 200 ok."""
    while True:
        conn.read_head()
        conn.send(ok_response())


def named(name: bytes) -> Handler:
    """A keep-alive upstream handler answering every request with 200 and body `name`."""

    def handler(conn: RawConn) -> None:
        while True:
            conn.read_head(timeout=30)  # a pooled connection may idle between requests
            conn.send(ok_response(name))

    return handler


def recording_ok(heads: list[bytes]) -> Handler:
    """A keep-alive handler that answers every bodiless request 200 and keeps its head."""

    def handler(conn: RawConn) -> None:
        while True:
            heads.append(conn.read_head(timeout=30))
            conn.send(ok_response())

    return handler


def accept_upgrade(conn: RawConn, extra: bytes = b"") -> bytes:
    """Read an upgrade request head and answer a correct 101; returns the head."""
    head = conn.read_head(timeout=WAIT)
    conn.send(switching(head, extra))
    conn.sock.settimeout(WAIT)
    return head


def echo(conn: RawConn) -> None:
    """Send back every byte (those already buffered first) until the peer's FIN, then close."""
    conn.sock.settimeout(None)
    with contextlib.suppress(OSError):
        if conn.received:
            conn.send(bytes(conn.received))
            conn.received.clear()
        while data := conn.sock.recv(65536):
            conn.sock.sendall(data)
    conn.close()  # a FIN back, so the proxy's tunnel is done both ways


def echo_after_switch(tag: bytes = b"") -> Handler:
    """An upstream that accepts the WebSocket upgrade, sends `tag`, then echoes until EOF."""

    def handler(conn: RawConn) -> None:
        accept_upgrade(conn)
        if tag:
            conn.send(tag)
        echo(conn)

    return handler


# --- a named pool member ----------------------------------------------------------------------


class Backend:
    """A named upstream server for pool tests.

    It answers plain requests with its name (keep-alive; with `close`, `Connection: close`
    and then it waits for the proxy to close, counting that in `closed`, so every request is
    a fresh pick), upgrades WebSocket requests (its name and a newline right behind the 101,
    then an echo), holds a request for /hold until `hold` is set, and answers `/healthz` as
    the test sets `health`: ok, fail (503), hang, reset, garbage, bad-accept (a 101 with a
    wrong Sec-WebSocket-Accept) or no-101 (a 200 to a WebSocket check).
    """

    def __init__(
        self, make: Callable[[Handler], RawUpstream], name: str, *, close: bool = False,
        hold: threading.Event | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.health = "ok"
        self.requests: list[bytes] = []  # request heads other than health checks
        self.checks: list[bytes] = []  # health-check heads
        self.closed = 0  # connections the proxy has closed (with `close`)
        self._close, self._hold = close, hold
        self._lock = threading.Lock()
        self.up = make(self._handle)

    @property
    def port(self) -> int:
        return self.up.port

    @property
    def address(self) -> str:
        return self.up.address

    def _handle(self, conn: RawConn) -> None:
        try:
            self._serve(conn)
        finally:
            if self._close:
                conn.close()
                with self._lock:
                    self.closed += 1

    def _serve(self, conn: RawConn) -> None:
        while True:
            head = conn.read_head(timeout=30)
            if head.split(b" ")[1].startswith(b"/healthz"):
                with self._lock:
                    self.checks.append(head)
                self._health(conn, head)
                return
            with self._lock:
                self.requests.append(head)
            if (header(head, b"upgrade") or b"").lower() == b"websocket":
                conn.send(switching(head) + self.name.encode() + b"\n")
                echo(conn)
                return
            if head.startswith(b"GET /hold ") and self._hold is not None:
                self._hold.wait(WAIT)
            if self._close:
                conn.send(ok_response(self.name.encode(), b"Connection: close\r\n"))
                conn.read_until_close(timeout=30)
                return
            conn.send(ok_response(self.name.encode()))

    def wait_closed(self, count: int) -> None:
        """Until the proxy has closed `count` connections: done with those exchanges."""
        assert eventually(lambda: self.closed >= count), f"{self.name}: {self.closed} closed"

    def _health(self, conn: RawConn, head: bytes) -> None:
        mode = self.health
        upgrade = header(head, b"upgrade") is not None
        if mode == "ok" and upgrade:
            conn.send(switching(head))
            conn.read_until_close(timeout=5)
        elif mode in ("ok", "no-101"):
            conn.send(ok_response(b"healthy", b"Connection: close\r\n"))
        elif mode == "fail":
            conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        elif mode == "hang":
            conn.read_until_close(timeout=30)
        elif mode == "reset":
            conn.reset()
        elif mode == "garbage":
            conn.send(b"\x00\x01 this is not HTTP\r\n\r\n")
        elif mode == "bad-accept":
            conn.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n"
            )
        conn.close()

    def served(self) -> int:
        with self._lock:
            return len(self.requests)


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full, so a new connection is never accepted (SYNs are
    dropped): a connect to it times out instead of being refused. (listener, fillers)."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(listener.getsockname())
        except OSError:
            s.close()
            break
        fillers.append(s)
    return listener, fillers


def served_by(target: int | Address, path: str = "/", extra: bytes = b"",
              source: str | None = None) -> str:  # fmt: skip
    """The name of the `Backend` that answered `GET path` (it must answer 200)."""
    status, _, body = http(target, path, extra=extra, source=source)
    assert status == 200, (status, body)
    return body.decode()


def named_tunnel(target: int | Address, path: str = "/ws", extra: bytes = b"") -> Tunnel:
    """A WebSocket tunnel to a `Backend`: `server` is the name it sent behind the 101."""
    return Tunnel(target, path, extra, tag=b"\n")
