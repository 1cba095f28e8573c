"""The I/O adapter: an h11 connection bound to a trio stream, and stream helpers.

h11 decides, trio moves bytes. Socket errors are mapped here (trio's own
`_translate_socket_errors_to_stream_errors` already turns OSError into Broken/Closed).
"""

from __future__ import annotations

import contextlib
import operator
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Final, cast

import h11
import trio

from upgradeproxy.errors import ClientGone

MAX_RECV: Final = 65536

# Everything a peer can do to a socket that ends the conversation.
STREAM_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PeerClosed(Exception):
    """The peer went away (EOF, reset) where the protocol needed more."""


ErrorFactory = Callable[[BaseException], BaseException]


class ErrorMap:
    """Translate exceptions at a boundary, first match wins (httpcore's `map_exceptions`).

    A class rather than a generator context manager: it sits on the per-request path.
    """

    __slots__ = ("_rules",)

    def __init__(self, *rules: tuple[tuple[type[BaseException], ...], ErrorFactory]) -> None:
        self._rules = rules

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        for kinds, make in self._rules:
            if isinstance(exc, kinds):
                raise make(exc) from exc


# Reads and writes on the client's stream: whatever breaks it, the client is gone.
CLIENT_IO: Final = ErrorMap(((*STREAM_ERRORS, PeerClosed), lambda exc: ClientGone(str(exc))))


class HttpStream:
    """One side of the proxy: an `h11.Connection` plus the stream it speaks over.

    `queue` + `flush` let a caller coalesce several events (a response head and its first
    body chunk) into one write: one syscall instead of two on the hot path.
    """

    __slots__ = ("_out", "_sock", "h11", "stream")

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        self.h11 = conn
        self.stream = stream
        self._out: list[bytes] = []
        # A plain TCP stream is read and written on its socket directly (see receive_some).
        self._sock = plain_socket(stream)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The next event, reading as needed; h11.RemoteProtocolError propagates."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                await self.receive()
                continue
            return event  # type: ignore[return-value]

    async def receive(self) -> None:
        """Read once from the stream into h11 (b"" on EOF, so h11 sees the close)."""
        try:
            data = await self.receive_some()
        except STREAM_ERRORS as exc:
            raise PeerClosed(str(exc)) from exc
        self.h11.receive_data(data)

    async def receive_some(self) -> bytes:
        """Up to MAX_RECV bytes (b"" on EOF); raises STREAM_ERRORS.

        On a plain socket: the non-blocking recv first, an epoll wait only on EAGAIN. trio's
        SocketStream does the same but then always yields to the scheduler (a checkpoint,
        an extra trip through the run loop per call); here a call that did not have to wait
        is a cancel point but not a schedule point: every request still waits for its
        upstream's answer, which schedules.
        """
        sock = self._sock
        if sock is None:
            return cast(bytes, await self.stream.receive_some(MAX_RECV))
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return sock.recv(MAX_RECV)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)

    def try_receive_some(self) -> bytes | None:
        """What a non-blocking read gives now (b"" on EOF), None if it would block or this
        is not a plain socket; raises OSError. Lets a caller skip a cancel scope."""
        sock = self._sock
        if sock is None:
            return None
        try:
            return sock.recv(MAX_RECV)
        except BlockingIOError:
            return None

    async def last_look(self, wait: float) -> bytes | None:
        """After a cancelled read: what arrived meanwhile (b"" at EOF), None if nothing did.

        Behind TLS (or a PROXY header) the socket only tells that something came: it is read
        within `wait`. Raises STREAM_ERRORS.
        """
        if self._sock is not None:
            return self.try_receive_some()
        if not bytes_waiting(self.stream):
            return None
        with trio.move_on_after(wait):
            return cast(bytes, await self.stream.receive_some(MAX_RECV))
        return None

    def try_receive(self) -> bool:
        """`try_receive_some` into h11: True if it read (or saw EOF); raises PeerClosed."""
        try:
            data = self.try_receive_some()
        except OSError as exc:
            raise PeerClosed(str(exc)) from exc
        if data is None:
            return False
        self.h11.receive_data(data)
        return True

    def try_flush(self) -> bool:
        """Write what is queued without waiting: True if all of it left (what did not is
        kept for `flush`); raises OSError, after poisoning the h11 state as `flush` does."""
        if not self._out:
            return True
        sock = self._sock
        if sock is None:
            return False
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except BaseException:
            self.h11.send_failed()
            raise
        if sent < len(data):
            self._out.append(data[sent:])
            return False
        return True

    async def _send_all(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            await self.stream.send_all(data)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)

    async def send(self, event: h11.Event) -> None:
        """Serialize and write `event` (and anything queued before it)."""
        self.queue(event)
        await self.flush()

    def queue(self, event: h11.Event) -> None:
        """Serialize `event` for the next `flush`."""
        data = self.h11.send(event)
        if data:
            self._out.append(data)

    async def flush(self) -> None:
        """Write everything queued; a failed write poisons the h11 state, as it must."""
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        try:
            await self._send_all(data)
        except BaseException:
            # An interrupted write (trio.Cancelled included) leaves the peer mid-message.
            self.h11.send_failed()
            raise


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that first replays bytes already read from it (e.g. behind a PROXY header)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            # The same argument checks as a socket's: slicing would turn 0 into a false EOF.
            n = len(self._prefix) if max_bytes is None else operator.index(max_bytes)
            if n < 1:
                raise ValueError("max_bytes must be >= 1")
            # Checkpoint before taking the bytes: a cancellation there must not lose them.
            await trio.lowlevel.checkpoint()
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            return data
        return cast(bytes, await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        else:
            await self.stream.aclose()

    async def aclose(self) -> None:
        self._prefix = b""  # a closed stream replays nothing: receive_some raises Closed
        await self.stream.aclose()


def plain_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The stdlib socket of a plain trio SocketStream (non-blocking already), else None: what
    reads and writes that take no checkpoint (or a kernel splice, or an epoll set) work on."""
    if type(stream) is not trio.SocketStream:
        return None
    return _inner_socket(stream.socket)


def stdlib_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The stdlib socket inside a trio socket, for calls that must not take a checkpoint."""
    inner = _inner_socket(sock)
    if inner is None:
        raise TypeError(f"no stdlib socket inside {sock!r}")
    return inner


def _inner_socket(sock: trio.socket.SocketType) -> socket.socket | None:
    # trio keeps it in a private attribute; without one, callers fall back to trio's I/O.
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, socket.socket) else None


def raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under `stream`, looking through TLS, or None."""
    while True:
        if isinstance(stream, trio.SocketStream):
            return stream.socket
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        elif isinstance(stream, PrefixedStream):
            stream = stream.stream
        else:
            return None


def bytes_waiting(stream: trio.abc.Stream) -> bool:
    """Whether the socket under `stream` has something to read now (bytes, or an EOF)."""
    sock = raw_socket(stream)
    inner = None if sock is None or sock.fileno() < 0 else _inner_socket(sock)
    if inner is None:
        return False
    try:
        inner.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True  # a reset: the next read says so
    return True


def looks_closed(stream: trio.abc.Stream) -> bool:
    """An idle keep-alive connection that turned readable was closed (or is talking out of turn)."""
    sock = raw_socket(stream)
    inner = None if sock is None else _inner_socket(sock)
    if inner is None or inner.fileno() < 0:
        return True
    # A peek rather than select(): select() cannot take a descriptor of 1024 or more, and a
    # proxy holding thousands of tunnels has those.
    try:
        inner.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True  # EOF, or bytes nobody asked for


async def linger(stream: trio.abc.Stream, seconds: float = 1.0, limit: int = 1 << 20) -> None:
    """Half-close, then discard what the peer still sends for a moment (nginx's
    lingering_close): closing on unread bytes makes the kernel send a RST, which can destroy
    the response just written before the client reads it."""
    with trio.move_on_after(seconds), contextlib.suppress(*STREAM_ERRORS):
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        total = 0
        while total < limit and (data := await stream.receive_some(MAX_RECV)):
            total += len(data)


async def aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close, ignoring errors from a peer that is already gone; never blocks on cancellation."""
    if type(stream) is trio.SocketStream:
        # All SocketStream.aclose does besides a checkpoint; no scopes on the per-connection path.
        stream.socket.close()
        return
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(1),
        contextlib.suppress(*STREAM_ERRORS),
    ):
        await stream.aclose()
