"""Connections to upstream servers: connect (+TLS) under a deadline, and a keep-alive pool.

The pool only ever holds connections whose h11 state finished a whole exchange cleanly;
anything else (an upgrade attempt, an error, a half-read body) is closed, never reused.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import h11
import trio

from upgradeproxy.config.model import Address, Server, UpstreamTls
from upgradeproxy.transport.streams import STREAM_ERRORS, HttpStream, aclose_quietly, looks_closed

MAX_IDLE_PER_SERVER: Final = 256
# Below common upstream keep-alive timeouts (nginx 75 s, Node 5 s is the outlier) so that we
# rarely pick a connection the server is closing; stale picks are retried anyway.
IDLE_EXPIRY: Final = 4.0


class ConnectFailed(Exception):
    """Could not open a connection to one server; `timed_out` tells refusal from slowness."""

    def __init__(self, server: Server, why: str, *, timed_out: bool = False) -> None:
        super().__init__(f"{server.address}: {why}")
        self.server = server
        self.timed_out = timed_out


@dataclass(slots=True, eq=False)
class UpstreamConn:
    server: Server
    http: HttpStream
    reused: bool = False
    idle_since: float = 0.0

    @property
    def stream(self) -> trio.abc.Stream:
        return self.http.stream


async def connect(
    server: Server,
    timeout: float,
    tls: UpstreamTls | None,
    tls_ctx: ssl.SSLContext | None,
    preamble: bytes | Callable[[trio.SocketStream], bytes] = b"",
) -> trio.abc.Stream:
    """TCP (+TLS) connect to `server` within `timeout` seconds, or raise ConnectFailed.

    `preamble` (a PROXY header, rule 15) is the first thing sent, before any TLS handshake;
    given as a function, it is built from the connected socket (its own addresses).
    """
    addr = server.address
    try:
        raw = _start_tcp(addr.host, addr.port)
        if raw is not None and tls is None and not preamble and _connected(raw):
            # A connect to a nearby server (loopback, a sidecar) is done when connect()
            # returns: no deadline and no wait needed.
            return _socket_stream(raw)
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            return await _finish(raw, addr.host, addr.port, tls, tls_ctx, preamble)
        raise ConnectFailed(server, f"connect timed out after {timeout:g}s", timed_out=True)
    except (*STREAM_ERRORS, ssl.SSLError) as exc:
        raise ConnectFailed(server, str(exc) or type(exc).__name__) from exc


async def _finish(
    raw: socket.socket | None,
    host: str,
    port: int,
    tls: UpstreamTls | None,
    tls_ctx: ssl.SSLContext | None,
    preamble: bytes | Callable[[trio.SocketStream], bytes],
) -> trio.abc.Stream:
    """Wait for the connect `_start_tcp` began (or resolve `host`), send `preamble`, then TLS."""
    if raw is None:
        tcp = await trio.open_tcp_stream(host, port)
    else:
        try:
            if not _connected(raw):
                await trio.lowlevel.wait_writable(raw)
                if err := raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(err, os.strerror(err))
        except BaseException:
            raw.close()
            raise
        tcp = _socket_stream(raw)
    stream: trio.abc.Stream = tcp
    if callable(preamble):
        preamble = preamble(tcp)
    if preamble:
        try:
            await stream.send_all(preamble)
        except BaseException:
            await aclose_quietly(stream)
            raise
    if tls is not None and tls_ctx is not None:
        tls_stream = trio.SSLStream(
            stream, tls_ctx, server_hostname=tls.server_name or host, https_compatible=True
        )
        try:
            await tls_stream.do_handshake()
        except BaseException:
            await aclose_quietly(stream)
            raise
        stream = tls_stream
    return stream


@functools.lru_cache(maxsize=4096)
def _ip_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP literal, None for a name (to be resolved)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def _start_tcp(host: str, port: int) -> socket.socket | None:
    """A non-blocking socket whose connect to IP literal `host` has begun; None for a name,
    which goes through open_tcp_stream (resolution, happy eyeballs). Raises OSError."""
    family = _ip_family(host)
    if family is None:
        return None
    raw = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    err = raw.connect_ex((host, port))
    if err and err != errno.EINPROGRESS:
        raw.close()
        raise OSError(err, os.strerror(err))
    return raw


def _connected(raw: socket.socket) -> bool:
    """Whether a non-blocking connect has completed (on loopback it has when connect returns)."""
    try:
        raw.getpeername()
    except OSError:
        return False
    return True


def _socket_stream(raw: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(raw))  # sets TCP_NODELAY


@dataclass(slots=True)
class Pool:
    """Idle keep-alive connections per server, most recently used first."""

    idle: dict[tuple[Server, UpstreamTls | None], deque[UpstreamConn]] = field(default_factory=dict)

    def take(
        self, server: Server, tls: UpstreamTls | None, *, probe: bool = True
    ) -> UpstreamConn | None:
        """A live idle connection to `server`, or None; stale ones are closed on the way.

        `probe` checks the socket for a close first (one syscall); a request without a body
        may skip it because a stale pick is retried on a fresh connection anyway.
        """
        queue = self.idle.get((server, tls))
        now = trio.current_time()
        while queue:
            conn = queue.pop()
            if now - conn.idle_since < IDLE_EXPIRY and not (probe and looks_closed(conn.stream)):
                conn.reused = True
                return conn
            _close_nowait(conn)
        return None

    def put(self, conn: UpstreamConn, tls: UpstreamTls | None) -> None:
        """Keep `conn` for reuse if its last exchange ended cleanly; otherwise close it."""
        h = conn.http.h11
        if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            _close_nowait(conn)
            return
        h.start_next_cycle()
        queue = self.idle.setdefault((conn.server, tls), deque())
        if len(queue) >= MAX_IDLE_PER_SERVER:
            _close_nowait(queue.popleft())
        conn.idle_since = trio.current_time()
        queue.append(conn)

    def forget(self, address: Address) -> None:
        """Close the idle connections to a server that left the upstream (rule 16)."""
        for key in [key for key in self.idle if key[0].address == address]:
            queue = self.idle.pop(key)
            while queue:
                _close_nowait(queue.pop())

    def close_all(self) -> None:
        for queue in self.idle.values():
            while queue:
                _close_nowait(queue.pop())


def _close_nowait(conn: UpstreamConn) -> None:
    """Close without awaiting: a plain socket closes at once, TLS skips close_notify."""
    stream = conn.stream
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()


def new_upstream_conn(server: Server, stream: trio.abc.Stream) -> UpstreamConn:
    """Wrap a fresh stream in an h11 client connection."""
    return UpstreamConn(server, HttpStream(h11.Connection(h11.CLIENT), stream))
