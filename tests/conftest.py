"""Shared test peers: the proxy in a thread, a websockets upstream, a raw-socket upstream.

End-to-end tests are plain synchronous functions: each peer runs its own event loop in a
thread (trio for the proxy, asyncio for `websockets`), and tests talk to them over real
loopback sockets with blocking clients, exactly as an outside user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from upgradeproxy.config.loader import parse_config
from upgradeproxy.config.model import Config
from upgradeproxy.service.server import Proxy

LOOPBACK = "127.0.0.1"


# --- the proxy -------------------------------------------------------------------------


class ProxyThread:
    """A `Proxy` running under `trio.run` in a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proxy: Proxy | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            proxy = Proxy(self.config)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.run)
                self.proxy = proxy
                self._ready.set()

        try:
            trio.run(run)
        except BaseException as exc:  # surfaced to the test that started us
            self._error = exc
            self._ready.set()

    @property
    def port(self) -> int:
        assert self.proxy is not None
        return self.proxy.addresses[0][1]

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        return f"{scheme}://{LOOPBACK}:{self.port}{path}"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a sync function in the proxy's trio thread (e.g. reload, drain)."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def reload(self, config: Config) -> None:
        assert self.proxy is not None
        trio.from_thread.run(self.proxy.reload, config, trio_token=self._token)

    def drain(self) -> None:
        assert self.proxy is not None
        self.call(self.proxy.drain)

    @property
    def telemetry(self) -> Any:
        assert self.proxy is not None
        return self.proxy.shared.telemetry

    def stop(self, timeout: float = 10) -> None:
        if self.proxy is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                self.drain()
        self._thread.join(timeout)


@pytest.fixture
def make_proxy() -> Iterator[Callable[[str], ProxyThread]]:
    """`make_proxy(yaml_text)` starts a proxy (listen on `127.0.0.1:0`) in a thread."""
    started: list[ProxyThread] = []

    def make(yaml_text: str) -> ProxyThread:
        p = ProxyThread(parse_config(yaml_text, "test.yaml"))
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def proxy_yaml(upstream_port: int, *, route: str = "", extra: str = "", upstream: str = "") -> str:
    """A one-upstream config; `route` adds keys to the single route, `extra` top-level keys."""
    route_keys = (
        ("\n" + "\n".join("    " + line for line in route.strip().splitlines())) if route else ""
    )
    upstream_keys = (
        ("\n" + "\n".join("    " + line for line in upstream.strip().splitlines()))
        if upstream
        else ""
    )
    return f"""
listen:
  - address: "127.0.0.1:0"
upstreams:
  app:
    servers: ["127.0.0.1:{upstream_port}"]{upstream_keys}
routes:
  - upstream: app{route_keys}
{extra}
"""


# --- a websockets upstream -------------------------------------------------------------


class WsUpstream:
    """A `websockets` server in an asyncio thread; records each handshake's request headers."""

    def __init__(self, handler: Callable[..., Any] | None = None, **serve_kwargs: Any) -> None:
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

            def record(connection: Any, request: Any) -> None:
                self.requests.append(request)

            async with serve(
                self._handler, LOOPBACK, 0, process_request=record, max_size=None, **serve_kwargs
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                self._ready.set()
                await self._stop

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("websocket upstream did not start")

    @staticmethod
    async def _echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(5)


@pytest.fixture
def ws_upstream() -> Iterator[Callable[..., WsUpstream]]:
    """`ws_upstream(handler=None, **serve_kwargs)`: an echo (or custom) websockets upstream."""
    made: list[WsUpstream] = []

    def make(handler: Callable[..., Any] | None = None, **kwargs: Any) -> WsUpstream:
        up = WsUpstream(handler, **kwargs)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


# --- a raw-socket upstream -------------------------------------------------------------


@dataclass
class RawConn:
    """One accepted upstream connection, with every byte it received."""

    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    heads: list[bytes] = field(default_factory=list)  # every head read_head() returned

    def read_head(self, timeout: float = 5) -> bytes:
        """Read until the end of a request head; returns the head (bytes after stay buffered)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.received:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("upstream connection closed before a full head")
            self.received += data
        end = self.received.index(b"\r\n\r\n") + 4
        head = bytes(self.received[:end])
        del self.received[:end]
        self.heads.append(head)
        return head

    def read_exactly(self, n: int, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed after {len(self.received)} of {n} bytes")
            self.received += data
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    def read_until_close(self, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                break
            self.received += data
        out = bytes(self.received)
        self.received.clear()
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class RawUpstream:
    """A listening socket; each accepted connection is handed to `handler(conn)` in a thread.

    Every connection is kept in `self.conns` so tests can check what reached the upstream.
    """

    def __init__(self, handler: Callable[[RawConn], None] | None = None) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[RawConn] = []
        self.handler = handler
        self._accepted = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

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


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    """`raw_upstream(handler=None)`: a raw-socket upstream recording exact bytes."""
    made: list[RawUpstream] = []

    def make(handler: Callable[[RawConn], None] | None = None) -> RawUpstream:
        up = RawUpstream(handler)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def ok_response(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def respond_ok_forever(conn: RawConn) -> None:
    """A keep-alive upstream handler answering every bodiless request with 200 ok."""
    while True:
        conn.read_head()
        conn.send(ok_response())


# --- a raw client ----------------------------------------------------------------------


def raw_client(address: tuple[str, int], timeout: float = 5) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    return sock


def read_response_head(
    sock: socket.socket, buf: bytearray | None = None
) -> tuple[bytes, bytearray]:
    """Read one response head from `sock`; returns (head, bytes already read past it)."""
    buf = buf if buf is not None else bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"closed before a response head; got {bytes(buf)!r}")
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head, buf


def read_response(
    sock: socket.socket, buf: bytearray | None = None
) -> tuple[int, dict[bytes, bytes], bytes, bytearray]:
    """(status, lower-cased headers, body, leftover) for a Content-Length or chunked response."""
    head, buf = read_response_head(sock, buf)
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        while len(buf) < n:
            data = sock.recv(65536)
            if not data:
                raise EOFError("closed mid-body")
            buf += data
        body, buf = bytes(buf[:n]), buf[n:]
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body, buf = _read_chunked(sock, buf)
    return status, headers, body, buf


def _read_chunked(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytearray]:
    body = bytearray()
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(65536)
        line_end = buf.index(b"\r\n")
        size = int(bytes(buf[:line_end]).split(b";")[0], 16)
        del buf[: line_end + 2]
        while len(buf) < size + 2:
            buf += sock.recv(65536)
        body += buf[:size]
        del buf[: size + 2]
        if size == 0:
            return bytes(body), buf


# --- the command line ------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 30, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`upgradeproxy ARGS` as a subprocess, with its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "upgradeproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def refused(port: int, host: str = LOOPBACK) -> bool:
    """Whether a connection to `port` is refused now (nothing listens).

    A connection that lands on a listener as it closes is reset by the kernel rather than
    refused: that counts as "not yet", for a caller polling until it is refused.
    """
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    """A port nothing listens on right now (bind 0, read it back, close)."""
    host = LOOPBACK if family == socket.AF_INET else "::1"
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def eventually(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.05)
    return True


def recv_exactly(sock: socket.socket, n: int, buf: bytearray | None = None) -> bytes:
    """Exactly `n` bytes, taking first from `buf` (bytes read earlier past a head)."""
    buf = buf if buf is not None else bytearray()
    while len(buf) < n:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"closed after {len(buf)} of {n} bytes: {bytes(buf)[:200]!r}")
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


QUIET = 0.3  # how long "nothing more arrives" is watched for; never a pass/fail timing bound


def quiet_read(sock: socket.socket, wait: float = QUIET) -> tuple[bytes, bool]:
    """Whatever arrives until `wait` passes with nothing new, or EOF: (bytes, closed)."""
    out = bytearray()
    old = sock.gettimeout()
    sock.settimeout(wait)
    try:
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return bytes(out), False
            except ConnectionResetError:
                return bytes(out), True
            if not data:
                return bytes(out), True
            out += data
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(old)
