"""Accepting clients, and from an accepted socket to a stream that speaks HTTP: the PROXY
header, then TLS.

Bytes read past a PROXY header are replayed to the TLS layer (or to h11 on a plain
listener), so a header and a ClientHello that arrive in one segment both count.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import ssl
from collections.abc import Callable
from typing import Final

import trio

from upgradeproxy.connection.context import Peer
from upgradeproxy.rules.http2 import preface_match
from upgradeproxy.rules.proxy_protocol import (
    MAX_HEADER_BYTES,
    NEED_MORE,
    ProxyProtocolError,
    parse_proxy_header,
)
from upgradeproxy.transport.streams import (
    MAX_RECV,
    STREAM_ERRORS,
    PrefixedStream,
    stdlib_socket,
)
from upgradeproxy.transport.tls import client_subject

log = logging.getLogger("upgradeproxy")

# What accept(2) reports for one client that left before it was taken: skip it (trio's list).
_CLIENT_LEFT: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    )
    if hasattr(errno, name)
)  # fmt: skip


# Out of descriptors or kernel memory: wait and accept again, as trio's serve_listeners does
# (its ACCEPT_CAPACITY_ERRNOS).
_ACCEPT_RETRY: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def accept_clients(
    listener: trio.SocketListener,
    limiter: trio.CapacityLimiter,
    *,
    limited: Callable[[], None],
    stopping: Callable[[], bool],
    start: Callable[[trio.SocketStream, object], None],
) -> None:
    """Accept clients until cancelled (or `stopping()`), each holding a `limiter` slot (its
    token goes to `start` with the stream; `limited` is called when one has to wait)."""
    while True:
        # A client first, then a slot: a quiet listener must not hold a slot another one
        # needs. At max_connections the client waits in the kernel backlog. One client per
        # wake-up: taking the whole backlog at once measured no faster and, out of
        # descriptors, takes clients there is no upstream socket for.
        await trio.lowlevel.wait_readable(listener.socket)
        if stopping():
            # A new generation takes this client: the wake-up may come in the same scheduler
            # pass as the retire, before the cancel of this loop lands.
            return
        token = object()
        try:
            # trio's acquire and accept each take a checkpoint (a trip through the
            # scheduler); the wait above was one already.
            limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            limited()  # a client waits in the backlog
            await limiter.acquire_on_behalf_of(token)
        try:
            stream = accept_nowait(listener)
        except OSError as exc:
            limiter.release_on_behalf_of(token)
            if exc.errno not in _ACCEPT_RETRY:
                raise
            log.warning("accept failed, retrying: %s", exc)
            await trio.sleep(0.1)
            continue
        except BaseException:
            limiter.release_on_behalf_of(token)
            raise
        if stream is None:  # the client left before we took it
            limiter.release_on_behalf_of(token)
            continue
        start(stream, token)


def take_backlog(
    listener: trio.SocketListener,
    limiter: trio.CapacityLimiter,
    start: Callable[[trio.SocketStream, object], None],
) -> None:
    """Accept every client already in the listener's queue (as many as `limiter` allows),
    without waiting: a listening socket that closes resets them, though they may have sent a
    request already."""
    while True:
        token = object()
        try:
            limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            return
        try:
            stream = accept_nowait(listener)
        except (OSError, trio.ClosedResourceError):
            stream = None
        if stream is None:
            limiter.release_on_behalf_of(token)
            return
        start(stream, token)


def accept_nowait(listener: trio.SocketListener) -> trio.SocketStream | None:
    """A waiting client's stream, or None when none waits. Unlike trio's `accept` it takes
    no checkpoint, so a burst of clients costs one trip through the scheduler, not one each.

    Raises OSError (EMFILE and the like) and trio.ClosedResourceError.
    """
    sock = stdlib_socket(listener.socket)
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the listener was closed") from None
            if exc.errno in _CLIENT_LEFT:
                continue
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(conn))


async def open_client(
    stream: trio.abc.Stream,
    peer_ip: str,
    *,
    proxy_protocol: bool,
    tls: ssl.SSLContext | None,
    port: int = 0,
    local: tuple[str, int] | None = None,
) -> tuple[trio.abc.Stream, Peer] | None:
    """Peel the PROXY header, then do the TLS handshake: (the HTTP stream, its peer), or None
    if the connection is to be dropped. Bytes read past a PROXY header are replayed to TLS."""
    leftover = b""
    if proxy_protocol:
        found = await _read_proxy_header(stream)
        if found is None:
            return None
        peer_ip, port = found[0] or (peer_ip, port)
        leftover = found[1]
    if tls is None:
        return stream, Peer(peer_ip, False, leftover, port, local)
    transport = PrefixedStream(stream, leftover) if leftover else stream
    client = trio.SSLStream(transport, tls, server_side=True)
    try:
        await client.do_handshake()
    except (*STREAM_ERRORS, ssl.SSLError) as exc:
        log.info("%s: TLS handshake failed: %s", peer_ip, exc)
        return None
    subject = client_subject(client.getpeercert())
    return client, Peer(peer_ip, True, b"", port, local, subject)


async def _read_proxy_header(
    stream: trio.abc.Stream,
) -> tuple[tuple[str, int] | None, bytes] | None:
    """(client ip and port, or None for LOCAL, bytes after the header), or None if it is not
    one."""
    buf = b""
    while len(buf) <= MAX_HEADER_BYTES:
        try:
            found = parse_proxy_header(buf)
        except ProxyProtocolError as exc:
            log.info("bad PROXY protocol header: %s", exc)
            return None
        if found is not NEED_MORE:
            header, used = found
            return header.source, buf[used:]
        try:
            data = await stream.receive_some(MAX_HEADER_BYTES)
        except STREAM_ERRORS:
            return None
        if not data:
            return None
        buf += data
    return None


async def open_negotiated(
    stream: trio.abc.Stream,
    peer_ip: str,
    *,
    deadline: float,
    proxy_protocol: bool,
    tls: ssl.SSLContext | None,
    port: int = 0,
    local: tuple[str, int] | None = None,
) -> tuple[trio.abc.Stream, Peer, bool] | None:
    """`open_client` on an `http2` listener: (the stream, its peer, whether it speaks HTTP/2),
    by ALPN on TLS, by the connection preface in cleartext (rule 17); None to drop it. The
    PROXY header and TLS handshake must be done by `deadline`; a cleartext client still
    silent then is left to HTTP/1.1, whose `request_header` answers it (408)."""
    opened = None
    with trio.move_on_at(deadline):
        opened = await open_client(
            stream, peer_ip, proxy_protocol=proxy_protocol, tls=tls, port=port, local=local
        )
    if opened is None:
        return None
    client, peer = opened
    if isinstance(client, trio.SSLStream):
        return client, peer, client.selected_alpn_protocol() == "h2"
    sniffed = await sniff_preface(client, peer.leftover, deadline)
    if sniffed is None:
        return None
    return client, dataclasses.replace(peer, leftover=sniffed[1]), sniffed[0]


async def sniff_preface(
    stream: trio.abc.Stream, buf: bytes, deadline: float = math.inf
) -> tuple[bool, bytes] | None:
    """On a cleartext `http2` listener: (whether the client sent the HTTP/2 preface, the
    bytes read), or None if it left. Decided from the first bytes: an HTTP/1.1 request line
    differs from the preface in its first byte or two, so only a client whose bytes so far
    are a prefix of the preface is waited on (until `deadline`, then it is HTTP/1.1's).
    Every byte read is handed on, to h2 or h11."""
    while (found := preface_match(buf)) == "more":
        with trio.move_on_at(deadline) as scope:
            try:
                data = await stream.receive_some(MAX_RECV)
            except STREAM_ERRORS:
                return None
        if scope.cancelled_caught:
            return False, buf
        if not data:
            return None if not buf else (False, buf)
        buf += data
    return found == "h2", buf
