"""Shared test peers: the proxy in a thread, a websockets upstream, a raw-socket upstream.

End-to-end tests are plain synchronous functions: each peer runs its own event loop in a
thread (trio for the proxy, asyncio for `websockets`), and tests talk to them over real
loopback sockets with blocking clients, exactly as an outside user would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import pty
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

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


@pytest.fixture
def client() -> Iterator[Callable[[ProxyThread], socket.socket]]:
    """`client(proxy)`: a raw client socket to `proxy`, closed at teardown."""
    socks: list[socket.socket] = []

    def make(proxy: ProxyThread) -> socket.socket:
        s = raw_client(proxy.address)
        socks.append(s)
        return s

    yield make
    for s in socks:
        s.close()


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


# --- shared by several test files: waits, WebSocket constants, head parsing ----------------

WAIT = 10.0  # the bound on every wait; tests pass in a fraction of it
FAST_DRAIN = "timeouts: {drain: 1}"

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_HEADERS = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"
)
SWITCH_WS = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\n"
)


def ws_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value for `key` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_request(
    *extra: bytes,
    target: bytes = b"/chat",
    method: bytes = b"GET",
    upgrade: bytes | None = b"websocket",
    connection: bytes = b"Upgrade",
    body: bytes = b"",
) -> bytes:
    """An RFC 6455 opening handshake to app.example (plus `extra` header lines); an empty
    `connection` or a None `upgrade` leaves that field out."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: app.example"]
    if connection:
        lines.append(b"Connection: " + connection)
    if upgrade is not None:
        lines.append(b"Upgrade: " + upgrade)
    lines += [b"Sec-WebSocket-Key: " + WS_KEY, b"Sec-WebSocket-Version: 13", *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(start line, [(name, value)]) with names as sent and values stripped."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name, value.strip()))
    return lines[0], fields


def values(head: bytes, name: bytes) -> list[bytes]:
    """Every value of `name` (case-insensitive), in order."""
    return [v for n, v in parse_head(head)[1] if n.strip().lower() == name.lower()]


def elements(head: bytes, name: bytes) -> list[bytes]:
    """The comma-separated elements of every `name` field."""
    return [e.strip() for v in values(head, name) for e in v.split(b",") if e.strip()]


def names(head: bytes) -> set[bytes]:
    """The lower-cased field names of a head."""
    return {n.strip().lower() for n, _ in parse_head(head)[1]}


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def proxy_v2_header(source: str, port: int = 443) -> bytes:
    """A PROXY protocol v2 header: PROXY command, TCP over IPv4, `source` -> 127.0.0.1:`port`."""
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    return (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + bytes([0x21, 0x11])
        + struct.pack("!H", 12)
        + addresses
        + struct.pack("!HH", 40000, port)
    )


def read_to_eof(sock: socket.socket, timeout: float = 5) -> tuple[bytes, bool]:
    """(bytes, closed): everything until EOF/RST, or what came before `timeout` passed."""
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(out), True
        except TimeoutError:
            return bytes(out), False
        if not data:
            return bytes(out), True
        out += data


def assert_short_error(body: bytes) -> None:
    """Rule 7: a short text body, never a traceback."""
    assert len(body) < 256, body
    assert b"Traceback" not in body, body
    assert b'File "' not in body, body
    with contextlib.suppress(UnicodeDecodeError):
        body.decode("utf-8")
        return
    pytest.fail(f"error body is not text: {body!r}")


def rst(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def raw_tunnel(address: tuple[str, int], target: bytes = b"/t") -> tuple[socket.socket, bytes]:
    """Client side of a WebSocket handshake through the proxy: (socket, bytes behind the 101)."""
    key = base64.b64encode(os.urandom(16))
    sock = raw_client(address, timeout=WAIT)
    sock.sendall(
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head, rest = read_response_head(sock)
    assert status_of(head) == 101, head
    return sock, bytes(rest)


def get(address: tuple[str, int], path: bytes = b"/") -> tuple[int, bytes]:
    """One `GET path` with `Connection: close` on a fresh connection: (status, body)."""
    with raw_client(address, timeout=WAIT) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body, _ = read_response(sock)
    return status, body


def named(name: bytes) -> Callable[[RawConn], None]:
    """A keep-alive upstream handler answering every request with 200 and body `name`."""

    def handler(conn: RawConn) -> None:
        while True:
            conn.read_head(timeout=30)  # a pooled connection may idle between requests
            conn.send(ok_response(name))

    return handler


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throw-away certificate authority."""
    return trustme.CA()


# --- a proxy process ---------------------------------------------------------------------

PY_M = [sys.executable, "-m", "upgradeproxy"]
CONSOLE_SCRIPT = Path(sys.executable).with_name("upgradeproxy")
CONSOLE = [str(CONSOLE_SCRIPT)]
ENTRY_POINTS = pytest.mark.parametrize("entry", [PY_M, CONSOLE], ids=["python-m", "console"])

Record = dict[str, Any]

# A one-route config for a process: format with `port` (listen) and `upstream`.
GOOD_CONFIG = """\
listen:
  - address: "127.0.0.1:{port}"
upstreams:
  app:
    servers: ["127.0.0.1:{upstream}"]
routes:
  - upstream: app
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UPGRADEPROXY_CONFIG"}
    env.update(extra)
    return env


def cli(cmd: list[str], *args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, check=False,
        env=env or clean_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip


class Proc:
    """A CLI process in its own session; stdout and stderr collected line by line.

    `tty=True` gives it a pseudo-terminal as stderr (stdout stays a pipe).
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, tty: bool = False):
        self.err: list[str] = []
        self.out: list[str] = []
        self._cond = threading.Condition()
        self._open = 2
        master = slave = -1
        if tty:
            master, slave = pty.openpty()
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=slave if tty else subprocess.PIPE, env=env or clean_env(),
            start_new_session=True,
        )  # fmt: skip
        assert self.popen.stdout is not None
        threading.Thread(
            target=self._pump_file, args=(self.popen.stdout, self.out), daemon=True
        ).start()
        if tty:
            os.close(slave)
            threading.Thread(target=self._pump_fd, args=(master,), daemon=True).start()
        else:
            assert self.popen.stderr is not None
            threading.Thread(
                target=self._pump_file, args=(self.popen.stderr, self.err), daemon=True
            ).start()

    def _add(self, sink: list[str], text: str) -> None:
        with self._cond:
            sink.append(text.rstrip("\r\n"))
            self._cond.notify_all()

    def _done(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def _pump_file(self, stream: Any, sink: list[str]) -> None:
        for raw in stream:
            self._add(sink, raw.decode(errors="replace"))
        self._done()

    def _pump_fd(self, fd: int) -> None:
        buf = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self._add(self.err, line.decode(errors="replace"))
        if buf:
            self._add(self.err, buf.decode(errors="replace"))
        os.close(fd)
        self._done()

    # JSON view of stderr
    def records(self) -> list[Record]:
        with self._cond:
            lines = list(self.err)
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"msg": line, "not_json": True}
            out.append(rec if isinstance(rec, dict) else {"msg": line, "not_json": True})
        return out

    def wait_err(self, match: Callable[[str], bool], timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.err:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self._open == 0 and self.popen.poll() is not None):
                    raise AssertionError("no such stderr line; stderr:\n" + "\n".join(self.err))
                self._cond.wait(min(left, 0.1))

    def wait_record(self, match: Callable[[Record], bool], count: int = 1) -> list[Record]:
        deadline = time.monotonic() + WAIT
        while True:
            found = [r for r in self.records() if match(r)]
            if len(found) >= count:
                return found[:count]
            if time.monotonic() > deadline or (self._open == 0 and self.popen.poll() is not None):
                raise AssertionError(
                    f"{count} matching record(s) not logged; stderr:\n" + "\n".join(self.err)
                )
            with self._cond:
                self._cond.wait(0.1)

    def wait_msg(self, msg: str, count: int = 1, **fields: object) -> list[Record]:
        return self.wait_record(
            lambda r: r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items()), count
        )

    def access(self) -> list[Record]:
        return [r for r in self.records() if r.get("logger") == "upgradeproxy.access"]

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def wait_exit(self, timeout: float = WAIT) -> int:
        code = self.popen.wait(timeout)
        with self._cond:  # let the readers drain what is left
            end = time.monotonic() + 5
            while self._open and time.monotonic() < end:
                self._cond.wait(0.1)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(WAIT)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    """`spawn(argv, env=None, tty=False)`; every process is killed at the end of the test."""
    started: list[Proc] = []

    def make(argv: list[str], env: dict[str, str] | None = None, tty: bool = False) -> Proc:
        proc = Proc(argv, env, tty)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()


def start_proxy(spawn: Callable[..., Proc], config: Path, *extra: str, entry: list[str] = PY_M,
              env: dict[str, str] | None = None, tty: bool = False) -> Proc:  # fmt: skip
    """`upgradeproxy run --config FILE --log-format json EXTRA`, once it logs `listening`."""
    fmt = (
        () if any(a.startswith("--log-format") for a in extra) or tty else ("--log-format", "json")
    )
    proc = spawn([*entry, "run", "--config", str(config), *fmt, *extra], env=env, tty=tty)
    proc.wait_err(lambda line: "listening" in line)
    return proc


# --- clients and upstreams -------------------------------------------------------------


def http(
    port: int, path: str = "/", *, host: str = "svc.test", method: str = "GET",
    extra: bytes = b"", body: bytes | None = None, addr: str = LOOPBACK, close: bool = True,
) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    """One request on a fresh connection: (status, lower-cased headers, body); a `body` is
    sent with its Content-Length."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
    head += (b"Connection: close\r\n" if close else b"") + extra
    if body is not None:
        head += b"Content-Length: %d\r\n" % len(body)
    with socket.create_connection((addr, port), timeout=WAIT) as sock:
        sock.sendall(head + b"\r\n" + (body or b""))
        status, headers, data, _ = read_response(sock)
    return status, headers, data


def echo_after_switch(tag: bytes = b"") -> Callable[[RawConn], None]:
    """An upstream that accepts the WebSocket upgrade, sends `tag`, then echoes until EOF."""

    def handler(conn: RawConn) -> None:
        conn.read_head()
        conn.send(SWITCH_WS + tag)
        conn.sock.settimeout(None)
        while data := conn.sock.recv(65536):
            conn.sock.sendall(data)
        conn.close()

    return handler


def ws_upgrade(sock: socket.socket, path: str = "/ws", host: str = "svc.test") -> bytearray:
    """Send a WebSocket handshake on `sock`, expect a 101; returns bytes read past its head."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + WS_HEADERS + b"\r\n")
    head, buf = read_response_head(sock)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return buf


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(WAIT)
    try:
        while data := sock.recv(65536):
            del data
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def scrape(admin: int) -> dict[str, Any]:
    status, headers, body = http(admin, "/metrics")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of samples `name` whose labels include `labels` (0 if none)."""
    return sum(
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def write(path: Path, text: str) -> Path:
    """Replace `path` atomically, as a deploy tool would."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# --- the demo process --------------------------------------------------------------------

STARTUP_TIMEOUT = 15


class DemoProcess:
    """`upgradeproxy demo --port 0` in a subprocess; stdout is the banner, stderr the JSON log."""

    def __init__(self, *extra: str, port: str | None = "0") -> None:
        # A file, not a pipe: nobody reads stderr while the demo runs, and a full pipe would
        # stall its logging. Closed in `stop()`.
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        port_args = ("--port", port) if port is not None else ()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "upgradeproxy", "demo", *port_args, "--log-format",
             "json", *extra],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )  # fmt: skip
        self.banner = self._read_banner()
        found = re.search(r"Open\s+(http://127\.0\.0\.1:(\d+)/)", self.banner)
        upstream = re.search(r"built-in upstream 127\.0\.0\.1:(\d+)", self.banner)
        assert found, self.banner
        assert upstream, self.banner
        self.url, self.port = found[1], int(found[2])
        self.upstream_port = int(upstream[1])

    def _read_banner(self) -> str:
        """stdout up to the banner's last line, read in a thread so a hang cannot block us."""
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        text = ""
        while "Ctrl-C" not in text:
            try:
                text += lines.get(timeout=STARTUP_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no banner from the demo; so far:\n{text}\n{self.log_text()}")
        return text

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_text(self) -> str:
        # pread, not seek + read: the demo writes through a dup of this descriptor, which
        # shares its offset; a seek would make the demo's next line overwrite the start.
        fd = self.stderr.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]

    def tunnel_records(self, path: str = "/ws") -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("msg") == "tunnel" and r["path"] == path]

    def interrupt(self, timeout: float = 15) -> int:
        """SIGINT, as Ctrl-C would; returns the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.stderr.close()


@pytest.fixture
def demo() -> Iterator[DemoProcess]:
    """`upgradeproxy demo --port 0`, killed at the end of the test."""
    process = DemoProcess()
    yield process
    process.stop()
