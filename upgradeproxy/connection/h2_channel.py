"""One HTTP/2 client connection's I/O: the `h2` state machine bound to a trio stream, and
each stream's inbox and flow-control waits.

h2 decides (framing, HPACK, windows); this moves bytes. Every task may queue frames, but
only one writes at a time, and a write the client does not take within `timeouts.idle`
ends the connection (a client that never reads cannot hold the proxy's buffers).

Flow control: a stream's receive window is credited only when its bytes are consumed
(`ack`, after the upstream took them), so a stream's inbox never holds more than the
window we advertised (64 KiB, a tunnel's 256 KiB); the connection window is sized for
every stream's window at once, so one stalled stream cannot pin it.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
import trio
from hyperframe.frame import GoAwayFrame

from upgradeproxy.connection import h2_codec
from upgradeproxy.errors import ClientGone
from upgradeproxy.transport.streams import STREAM_ERRORS, plain_socket

STREAM_WINDOW: Final = 65535  # a request's: RFC 9113's initial window, no SETTINGS change
# A tunnel's (an accepted extended CONNECT). Its client's bytes are credited back a half window
# at a time, and each WINDOW_UPDATE is a write and a wake-up of the client: at 64 KiB they
# were a third of a tunnel's CPU per MiB.
TUNNEL_WINDOW: Final = 262144
MAX_WINDOW: Final = 2**31 - 1
# Bytes a stream task leaves to the connection's writer; past this it writes, and waits, itself.
COALESCE_MAX: Final = 65536
Fields = list[tuple[bytes, bytes]]

h2_codec.install()


class _ClosedMap:
    """h2 refuses frames on a stream or connection that closed under us (a reset or a GOAWAY
    crossed ours): for the stream's task, the client is gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, h2.exceptions.ProtocolError):
            raise ClientGone(f"stream closed: {exc}") from None


_CLOSED: Final = _ClosedMap()


@dataclass(slots=True, eq=False)
class StreamState:
    """What the connection's reader knows of one stream, for the task that serves it."""

    id: int
    inbox: deque[bytes] = field(default_factory=deque)
    ended: bool = False  # END_STREAM received
    reset: bool = False  # reset either way, or the connection is gone
    trailers: Fields = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)  # data, end, reset or window
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # its task's
    headers_sent: bool = False
    closed_out: bool = False  # END_STREAM sent
    client_reset: bool = False  # the client sent RST_STREAM
    tunnel: bool = False  # an accepted extended CONNECT: a reset ends its relay, not its task

    def wake(self) -> None:
        self.changed.set()

    async def wait(self) -> None:
        """Until the reader reports something for this stream."""
        if self.changed.is_set():
            self.changed = trio.Event()
        await self.changed.wait()


class Channel:
    """The h2 connection and its stream, shared by the reader and the stream tasks."""

    def __init__(self, stream: trio.abc.Stream, max_streams: int, max_header_bytes: int) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # rules.http2 checks requests itself: h2 would make a malformed request a
            # connection error, where RFC 9113 §8.1.1 wants a stream error (or a 400).
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            # What we send is checked already: h11 parsed the upstream's fields, and names
            # are lower-cased by rules.http2.response_fields.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        # In force at once, not only after the client acknowledges our SETTINGS.
        self.h2.decoder.max_header_list_size = max_header_bytes
        self.stream = stream
        self.streams: dict[int, StreamState] = {}
        self.write_timeout = math.inf
        self.dead = False
        self.closing = False  # the connection is ending: every flush writes at once
        self._lock = trio.Lock()
        # Bytes taken from h2 (or ours: a GOAWAY) and not written yet; they go first.
        self._queued: list[bytes] = []
        self._queued_size = 0
        self._wanted = trio.Event()  # the writer has something to write
        self._sock = plain_socket(stream)
        self._write_scope: trio.CancelScope | None = None  # the shielded write in progress
        self.h2.initiate_connection()
        window = min(max_streams * TUNNEL_WINDOW, MAX_WINDOW)
        if window > STREAM_WINDOW:
            self.h2.increment_flow_control_window(window - STREAM_WINDOW)

    # --- writing -------------------------------------------------------------------------

    async def flush(self, *, now: bool = False) -> None:
        """Have what h2 queued written. While other streams are open, it is left to the
        connection's `writer`, which runs after every task ready now has added its frames:
        one write for them all. Otherwise, with `now` (a tunnel's bytes, which do not wait for
        other streams'), or once `COALESCE_MAX` bytes wait, it is written at once (`write`),
        so a client that does not read still holds back its writers."""
        if self.try_flush(now=now):
            return
        await self.write()

    def try_flush(self, *, now: bool = False) -> bool:
        """`flush` without waiting: True when nothing is left for the caller to wait on (the
        bytes went out, or the writer has them). Raises ClientGone as `write` does."""
        if self.dead:
            return True
        if data := self.h2.data_to_send():
            self._queue(data)
        if not self._queued_size:
            return True
        if (
            not now
            and len(self.streams) > 1
            and not self.closing
            and self._queued_size < COALESCE_MAX
        ):
            self._wanted.set()
            return True
        if self._sock is None or self._lock.locked():
            return False
        return self._send_now()

    async def writer(self) -> None:
        """The connection's writer task: writes what `flush` left to it. Raises ClientGone
        once the client connection is dead."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await self.write()

    async def write(self) -> None:
        """Write everything queued now; raises ClientGone when the client does not take it
        within `write_timeout` or the stream broke (the connection is then dead).

        On a plain socket, a write that fits goes out at once, without a trip through the
        scheduler (as `transport.streams.HttpStream` does for HTTP/1.1). Otherwise the bytes
        are taken only once the lock is ours, and written shielded: a stream task cancelled
        mid-write (its stream was reset) must not leave half a frame on a connection that
        other streams share.
        """
        if self.dead:
            return
        if self._sock is not None and not self._lock.locked():
            if self._send_now():
                return
            self._lock.acquire_nowait()  # no await: nobody may write before the rest
        else:
            await self._lock.acquire()
        try:
            await self._send_all(self._take())
        finally:
            self._lock.release()

    def _send_now(self) -> bool:
        """Send what is queued on the plain socket without waiting; True if all of it went,
        else the rest is queued first. The caller checked that nobody holds the lock."""
        assert self._sock is not None
        data = self._take()
        if not data:
            return True
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.dead = True
            raise ClientGone(f"client connection broke: {exc}") from None
        if sent == len(data):
            return True
        self._queue(data[sent:])
        return False

    def _queue(self, data: bytes) -> None:
        self._queued.append(data)
        self._queued_size += len(data)

    def _take(self) -> bytes:
        if data := self.h2.data_to_send():
            self._queue(data)
        queued = self._queued
        if not queued:
            return b""
        data = queued[0] if len(queued) == 1 else b"".join(queued)
        queued.clear()
        self._queued_size = 0
        return data

    async def _send_all(self, data: bytes) -> None:
        if not data or self.dead:
            return
        deadline = trio.current_time() + self.write_timeout
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            self._write_scope = scope
            try:
                await self.stream.send_all(data)
            except STREAM_ERRORS as exc:
                self.dead = True
                raise ClientGone(f"client connection broke: {exc}") from None
            finally:
                self._write_scope = None
        if scope.cancelled_caught:
            self.dead = True
            raise ClientGone("client stopped reading")

    def hurry(self, grace: float) -> None:
        """The connection is ending: a write in progress, and any after it, get at most
        `grace` seconds more (shielded writes ignore the cancel that ends the connection)."""
        self.closing = True
        self.write_timeout = min(self.write_timeout, grace)
        if self._write_scope is not None:
            self._write_scope.deadline = min(
                self._write_scope.deadline, trio.current_time() + grace
            )

    async def goaway(self, last_stream_id: int) -> None:
        """A graceful GOAWAY (drain): streams up to `last_stream_id` go on. Written beside
        h2, whose own GOAWAY ends the connection's state machine for every stream."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._queue(self.h2.data_to_send() + frame.serialize())
        await self.write()

    def recode_goaway(self, code: int) -> None:
        """Give the GOAWAY h2 just queued (its last frame) the error `code` instead."""
        data = self.h2.data_to_send()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = code
        ours = frame.serialize()
        if len(data) >= len(ours) and data[-len(ours) + 3] == GoAwayFrame.type:
            data = data[: -len(ours)]
        self._queue(data + ours)  # written by the next write

    async def send_headers(
        self, st: StreamState, fields: Fields, *, end: bool = False, flush: bool = True
    ) -> None:
        """Queue a HEADERS frame (and write it, unless `flush` is False: more follows)."""
        if st.reset or st.closed_out:
            raise ClientGone("stream reset by the client")
        with _CLOSED:
            self.h2.send_headers(st.id, fields, end_stream=end)
        st.closed_out = end
        if flush:
            await self.flush()

    async def send_data(
        self,
        st: StreamState,
        data: bytes,
        *,
        end: bool = False,
        timeout: float = math.inf,
        flush: bool = True,
    ) -> None:
        """Send `data` as the stream's and the connection's windows allow, waiting for them
        to open (at most `timeout` each time: a client that stops reading is gone). With
        `flush` False, what the windows allow at once stays queued for the next flush."""
        view = memoryview(data)
        while view:
            window = self.h2.local_flow_control_window(st.id) if not st.reset else 0
            if window <= 0:
                await self.flush()  # what is queued goes before we wait
                window = await self.wait_window(st, timeout)
            n = min(window, self.h2.max_outbound_frame_size, len(view))
            last = end and n == len(view)  # END_STREAM on the last frame, not one of its own
            with _CLOSED:
                self.h2.send_data(st.id, view[:n].tobytes(), end_stream=last)
            if last:
                st.closed_out = True
            view = view[n:]
        if end and not st.closed_out:
            await self.end_stream(st)
        elif flush or end:
            await self.flush()

    async def wait_window(self, st: StreamState, timeout: float = math.inf) -> int:
        """The stream's send window once it is open; raises ClientGone on a reset or when it
        stays shut for `timeout`."""
        with trio.move_on_after(timeout):
            while True:
                if st.reset or st.closed_out or self.dead:
                    raise ClientGone("stream reset by the client")
                window = self.h2.local_flow_control_window(st.id)
                if window > 0:
                    return window
                await st.wait()
        raise ClientGone("client stopped reading (flow-control window shut)")

    async def end_stream(self, st: StreamState, trailers: Fields | None = None) -> None:
        if st.reset or st.closed_out:
            return
        with _CLOSED:
            if trailers:
                self.h2.send_headers(st.id, trailers, end_stream=True)
            else:
                self.h2.end_stream(st.id)
        st.closed_out = True
        await self.flush()

    def widen(self, st: StreamState, window: int) -> None:
        """Raise the stream's receive window to `window` (sent with the next flush)."""
        with _CLOSED:
            self.h2.increment_flow_control_window(window - STREAM_WINDOW, stream_id=st.id)

    def reset(self, st: StreamState, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset a stream that is still open on our side (queued; the next flush sends it)."""
        if st.reset or self.dead:
            return
        st.reset = True
        st.wake()
        # Closed both ways already, or the connection is: nothing to reset.
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(st.id, code)

    # --- reading -------------------------------------------------------------------------

    async def receive(self, st: StreamState) -> bytes | None:
        """The stream's next DATA bytes, None at END_STREAM; trio.BrokenResourceError when
        it was reset. The caller `ack`s them once they are passed on."""
        while not st.inbox:
            if st.reset:
                raise trio.BrokenResourceError("stream reset")
            if st.ended:
                return None
            await st.wait()
        return st.inbox.popleft()

    def ack(self, st: StreamState, n: int) -> None:
        """Credit `n` consumed bytes to the client's windows (sent with the next flush)."""
        if n and not self.dead:
            self.h2.acknowledge_received_data(n, st.id)

    def discard(self, st: StreamState) -> None:
        """Forget a finished stream, crediting what it never consumed (the connection's
        window would shrink for good otherwise)."""
        self.streams.pop(st.id, None)
        unread = sum(map(len, st.inbox))
        st.inbox.clear()
        self.ack(st, unread)
