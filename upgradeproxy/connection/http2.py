"""One HTTP/2 client connection (contract rule 17): read frames, start a task per stream,
protect the proxy from floods, and close on idle, drain or abuse.

Invariants:
- One nursery per connection; each stream is a named task in it. A stream's failure is
  the stream's (a response or a reset); the connection ends on a protocol error, a flood,
  EOF, `timeouts.idle` with no stream open, or a drain once its streams are done.
- A stream the client resets before its task ran never reaches an upstream (CVE-2023-44487:
  the frames of one read are all handled before any stream task runs).
- Floods (resets, PING, SETTINGS, empty DATA) are paid from token buckets; an empty bucket
  is GOAWAY ENHANCE_YOUR_CALM and a close. Header blocks are bounded by h2: at most
  `max_request_header_bytes` decoded (SETTINGS_MAX_HEADER_LIST_SIZE) and 64 CONTINUATION
  frames (CVE-2024-27316), a connection error beyond either.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Final

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
import trio

from upgradeproxy.connection.admission import admit_at_accept, release
from upgradeproxy.connection.context import Peer, Runtime, Shared
from upgradeproxy.connection.h2_channel import Channel, StreamState
from upgradeproxy.connection.h2_edge import H2Client
from upgradeproxy.connection.h2_request import serve_stream
from upgradeproxy.errors import ClientGone
from upgradeproxy.rules import http2 as rules
from upgradeproxy.rules.plan import Origin
from upgradeproxy.transport.streams import MAX_RECV, STREAM_ERRORS, aclose_quietly

log = logging.getLogger("upgradeproxy")

# PING, SETTINGS and empty DATA frames a client may send at once, and per second after.
CONTROL_BURST: Final = 100
CONTROL_RATE: Final = 20.0
# Client resets (rapid reset budget): every stream of a full connection at once (a page
# navigated away), twice; half of them per second after that. In streams of
# limits.http2_max_concurrent_streams.
RESET_BURST: Final = 2.0
RESET_RATE: Final = 0.5
# What a stream's last write, or any write once the connection ends, may still take.
_STREAM_END_GRACE: Final = 1.0


class _Flood(Exception):
    """The client spends a budget faster than it refills: GOAWAY and close."""


async def serve_http2(stream: trio.abc.Stream, peer: Peer, rt: Runtime, shared: Shared) -> None:
    """Serve one HTTP/2 client connection until it closes, idles out, floods or drains;
    `peer.leftover` holds bytes already read (the preface, at least, in cleartext)."""
    limits = rt.config.limits
    channel = Channel(stream, limits.http2_max_concurrent_streams, limits.max_request_header_bytes)
    channel.write_timeout = rt.config.timeouts.idle
    origin = Origin(peer.ip, b"https" if peer.tls else b"http", peer.client_cert)
    conn = H2Client(origin, rt, shared, peer, channel)
    try:
        admit_at_accept(conn)
        await _Driver(conn).run(peer.leftover)
    except ClientGone:
        pass
    finally:
        release(conn.held, shared)  # first: nothing below may skip it
        await aclose_quietly(stream)


class _Driver:
    """The reader of one connection and the bookkeeping of its streams."""

    def __init__(self, conn: H2Client) -> None:
        self.conn = conn
        self.channel = conn.channel
        config = conn.rt.config
        now = trio.current_time()
        n = config.limits.http2_max_concurrent_streams
        self.resets = rules.Budget(RESET_BURST * n, RESET_RATE * n, now)
        self.control = rules.Budget(CONTROL_BURST, CONTROL_RATE, now)
        self.active = 0
        self.last_stream = 0  # the highest stream id given a task
        self.goaway_sent = False
        # A new connection must send its first request head within request_header.
        self.deadline = now + config.timeouts.request_header
        self.read_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None

    async def run(self, first: bytes) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer, name="h2 writer")
                try:
                    await self._read_loop(first)
                finally:
                    nursery.cancel_scope.cancel()
                    self.channel.hurry(_STREAM_END_GRACE)
        finally:
            # What the streams left to the writer, cancelled with them.
            with trio.CancelScope(shield=True), contextlib.suppress(ClientGone):
                await self.channel.write()

    async def _writer(self) -> None:
        try:
            await self.channel.writer()
        except ClientGone:
            self.read_scope.cancel()  # the reader sees the channel dead, and ends

    async def _read_loop(self, first: bytes) -> None:
        h2conn, channel = self.channel.h2, self.channel
        await channel.write()  # our SETTINGS
        data: bytes | None = first
        while True:
            if data:
                try:
                    events = h2conn.receive_data(data)
                    for event in events:
                        self._dispatch(event)
                except h2.exceptions.ProtocolError as exc:
                    log.info("%s: HTTP/2 connection error: %s", self.conn.origin.ip, exc)
                    if isinstance(exc.__cause__, hpack.HPACKError) and not isinstance(
                        exc,
                        h2.exceptions.DenialOfServiceError,  # too large: ENHANCE_YOUR_CALM
                    ):
                        # RFC 9113 §4.3: COMPRESSION_ERROR, where h2 says PROTOCOL_ERROR.
                        channel.recode_goaway(h2.errors.ErrorCodes.COMPRESSION_ERROR)
                    await channel.write()  # h2 queued its GOAWAY
                    return
                except _Flood as exc:
                    log.warning("%s: HTTP/2 %s: GOAWAY", self.conn.origin.ip, exc)
                    h2conn.close_connection(
                        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, additional_data=str(exc).encode()
                    )
                    await channel.write()
                    return
                await channel.write()
            if self._should_goaway():
                self.goaway_sent = True
                await channel.goaway(self.last_stream)
            if self.goaway_sent and not self.active:
                return
            data = await self._receive()
            if data is None:
                return

    async def _receive(self) -> bytes | None:
        """The next bytes; None on EOF, a broken stream, or the connection's deadline (idle,
        or an unfinished header block past request_header)."""
        shared = self.conn.shared
        while not self.channel.dead:
            deadline = self.deadline if not self.active else math.inf
            if _header_block_pending(self.channel):
                deadline = min(
                    deadline, trio.current_time() + self.conn.rt.config.timeouts.request_header
                )
            self.read_scope = trio.CancelScope(deadline=deadline)
            with self.read_scope:
                shared.idle_waits.add(self.read_scope)  # a drain wakes us (for GOAWAY)
                try:
                    data = await self.channel.stream.receive_some(MAX_RECV)
                    return bytes(data) or None
                except STREAM_ERRORS:
                    return None
                finally:
                    shared.idle_waits.discard(self.read_scope)
            if trio.current_time() >= self.read_scope.deadline:
                if not self.goaway_sent:
                    self.channel.h2.close_connection(h2.errors.ErrorCodes.NO_ERROR)
                    await self.channel.write()
                return None
            if self.channel.dead:
                return None
            if self._should_goaway():
                return b""  # let the loop send GOAWAY
            if self.goaway_sent and not self.active:
                return None
        return None

    def _should_goaway(self) -> bool:
        """A drain (or retirement) began, or a 429's stream is done (rule 14: then close)."""
        if self.goaway_sent:
            return False
        return self.conn.shared.draining or (self.conn.refused and not self.active)

    # --- events --------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        channel, now = self.channel, trio.current_time()
        if isinstance(event, h2.events.RequestReceived):
            self._open(event)
        elif isinstance(event, h2.events.DataReceived):
            st = channel.streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if st is None or st.reset:
                self._ack_now(event.stream_id, event.flow_controlled_length)
                return
            if padding:
                self._ack_now(event.stream_id, padding)
            if event.data:
                st.inbox.append(event.data)
                st.wake()
            elif event.stream_ended is None and not self.control.spend(now):
                raise _Flood("empty DATA flood")
        elif isinstance(event, h2.events.StreamEnded):
            if (st := channel.streams.get(event.stream_id)) is not None:
                st.ended = True
                st.wake()
        elif isinstance(event, h2.events.TrailersReceived):
            if (st := channel.streams.get(event.stream_id)) is not None:
                st.trailers = _trailers(event.headers or [])
        elif isinstance(event, h2.events.StreamReset):
            self._reset(event, now)
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.control.spend(now):
                raise _Flood("SETTINGS flood")
            self._wake(0)
        elif isinstance(event, h2.events.PingReceived):
            if not self.control.spend(now):
                raise _Flood("PING flood")
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client is leaving: no new streams; those it had open finish (RFC 9113
            # §6.8), which h2, having closed its state machine, would refuse to send on.
            self.goaway_sent = True
            if event.error_code == h2.errors.ErrorCodes.NO_ERROR:
                self.channel.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN

    def _open(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        st = StreamState(sid)
        self.channel.streams[sid] = st
        if self.goaway_sent:
            self.channel.reset(st, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.channel.discard(st)
            return
        assert self.nursery is not None
        self.active += 1
        self.last_stream = sid
        ended = event.stream_ended is not None
        fields = list(event.headers or [])
        self.nursery.start_soon(self._stream, st, fields, ended, name=f"h2 stream {sid}")

    def _reset(self, event: h2.events.StreamReset, now: float) -> None:
        st = self.channel.streams.get(event.stream_id)
        if event.remote_reset and not self.resets.spend(now):
            raise _Flood("rapid reset (CVE-2023-44487)")
        if st is None:
            return
        st.reset = True
        st.client_reset = event.remote_reset
        st.wake()
        if not st.tunnel:
            st.scope.cancel()  # a tunnel sees a broken stream, and closes its upstream

    def _wake(self, stream_id: int) -> None:
        streams = self.channel.streams
        if stream_id:
            if (st := streams.get(stream_id)) is not None:
                st.wake()
            return
        for st in streams.values():
            st.wake()

    def _ack_now(self, stream_id: int, n: int) -> None:
        if n:
            self.channel.h2.acknowledge_received_data(n, stream_id)

    # --- stream tasks --------------------------------------------------------------------

    async def _stream(self, st: StreamState, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        channel = self.channel
        try:
            if not st.reset:  # reset in the same read that opened it: never started
                await serve_stream(self.conn, st, fields, end)
        finally:
            if not st.reset and not st.closed_out:
                channel.reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif not st.reset and not st.ended:
                # RFC 9113 §8.1: a complete response; the rest of the request is not needed.
                channel.reset(st, h2.errors.ErrorCodes.NO_ERROR)
            channel.discard(st)
            self.active -= 1
            if self.conn.refused and not self.goaway_sent:
                self.read_scope.cancel()  # rule 14: GOAWAY after the 429, then close
            if not self.active:
                self.deadline = trio.current_time() + self.conn.rt.config.timeouts.idle
                if self.goaway_sent:
                    self.read_scope.cancel()
                else:
                    self.read_scope.deadline = self.deadline
            try:
                if not channel.try_flush():
                    with trio.CancelScope(shield=True), trio.move_on_after(_STREAM_END_GRACE):
                        await channel.write()
            except ClientGone:
                self.read_scope.cancel()


def _header_block_pending(channel: Channel) -> bool:
    """Whether a HEADERS frame awaits its CONTINUATIONs (h2 keeps them until END_HEADERS)."""
    return bool(getattr(channel.h2.incoming_buffer, "_headers_buffer", None))


def _trailers(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Trailer fields that HTTP/1.1 chunked trailers can carry: no pseudo-headers, nothing
    connection-specific, nothing the message framing depends on."""
    banned = rules.CONNECTION_SPECIFIC | {b"content-length", b"host", b"te", b"trailer"}
    return [(n, v) for n, v in fields if not n.startswith(b":") and n.lower() not in banned]
