"""The frame-aware relay of a route with a `websocket` block (contract rule 18).

Each direction's bytes pass a `FrameGate` (rules/websocket_frames.py), which reads the frame
headers and counts payloads; every byte it lets through goes on unchanged. On raw sockets
under Linux a payload the gate has vouched for is spliced in the kernel in exact lengths, so
bulk never enters Python; the headers (and small frames) are read into Python, 16 KiB at most
at a time. Elsewhere (TLS, other streams) every byte is copied through Python.

On a violation the offending direction has stopped on a frame boundary; the other direction
is asked to stop on its next one. Then the offender gets a Close with the rule's code, the
other side a Close 1001 (masked, as a client's must be, when it goes to the server), and the
tunnel closes. A Close goes nowhere that is not on a frame boundary, half-closed, or already
sent one.

`FramedTunnel` is a plain object the tunnel holds, not its tasks: the frame state outlives
the pump tasks (a parked tunnel keeps it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import trio

from upgradeproxy.config.model import WebSocketLimits
from upgradeproxy.rules.websocket_frames import (
    CLOSE_GOING_AWAY,
    FrameGate,
    FramePolicy,
    RateBucket,
    Violation,
    close_frame,
    reserved_bits,
)
from upgradeproxy.telemetry.metrics import ExchangeRecord, Telemetry
from upgradeproxy.transport.streams import STREAM_ERRORS
from upgradeproxy.tunnel.relay import (
    _BULK_PIPE_SIZE,
    _HAVE_SPLICE,
    _SPLICE_FLAGS,
    SMALL,
    Pump,
    _close_pipe,
    _drain_pipe,
    _half_close,
    _open_pipe,
    write_all,
)
from upgradeproxy.tunnel.state import Direction, Tunnel

__all__ = ["FramedTunnel", "framed_tunnel"]

# How long the other direction may take to finish the frame under way, and a Close frame to
# be written, before the tunnel closes without it.
_CLOSE_GRACE: Final = 1.0
# Reads into Python start small (one message of a chat is a few hundred bytes) and grow to
# a pipe's worth while each read fills up: bulk of short frames then costs one read per
# 256 KiB, not per 16 KiB (measured: 2.6 -> 1.1 ms of CPU per MB of 16 KiB frames).
_SMALL_READ: Final = SMALL
_BULK_READ: Final = _BULK_PIPE_SIZE
# What is left of a frame's payload is spliced when it is at least this long; shorter ones
# ride along with the headers in those reads (splicing 16 KiB frames one by one cost more).
_SPLICE_MIN: Final = _BULK_READ

_Pump = Callable[[], Awaitable["Violation | None"]]


def framed_tunnel(
    limits: WebSocketLimits | None,
    protocols: list[bytes],
    extensions: list[bytes],
    route: str,
    telemetry: Telemetry,
) -> FramedTunnel | None:
    """The frame state for a tunnel that switched to `protocols` (the 101's `Upgrade`, or an
    RFC 8441 CONNECT's `:protocol`) with `extensions` (its `Sec-WebSocket-Extensions` values),
    or None: a route without a `websocket` block, or a tunnel that is not a WebSocket."""
    if limits is None or not any(p.lower() == b"websocket" for p in protocols):
        return None
    return FramedTunnel(limits, extensions, route, telemetry)


class _Way:
    """One direction while the pumps run: its gate, its own cancel scope (to stop it while it
    waits for bytes on a frame boundary) and whether it has ended or halted."""

    __slots__ = (
        "direction", "dst", "ended", "gate", "halted", "scope", "waiting",
    )  # fmt: skip

    def __init__(self, direction: Direction, gate: FrameGate, dst: trio.abc.Stream) -> None:
        self.direction = direction
        self.gate = gate
        self.dst = dst
        self.scope = trio.CancelScope()
        self.waiting = False  # in a receive, at a point where cancelling loses nothing
        self.halted = trio.Event()  # stopped on a boundary, or ended
        self.ended = False  # its source ended: the relay half-closes `dst`


class FramedTunnel:
    """The frame state of one WebSocket tunnel: a gate per direction, and what ended it."""

    __slots__ = (
        "_counters", "_first", "_reported", "down", "route", "telemetry", "up", "violation",
        "ways",
    )  # fmt: skip

    def __init__(
        self,
        limits: WebSocketLimits,
        extensions: list[bytes],
        route: str,
        telemetry: Telemetry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        rsv_first, rsv_rest = reserved_bits(extensions)

        def policy(sender: str) -> FramePolicy:
            return FramePolicy(
                "client" if sender == "client" else "server",
                limits.max_frame_bytes, limits.max_message_bytes, rsv_first, rsv_rest,
            )  # fmt: skip

        rate = limits.messages_per_second
        self.up = FrameGate(policy("client"), RateBucket(rate, clock) if rate else None)
        self.down = FrameGate(policy("server"))
        self.route = route
        self.telemetry = telemetry
        self.violation: Violation | None = None  # the one that ended the tunnel
        self.ways: dict[str, _Way] = {}
        self._counters = telemetry.websocket_counters(route)  # (up, down)
        self._reported = [0, 0]  # messages already added to them
        self._first: dict[str, bytes] = {}

    def early(self, client_rest: bytes, upstream_rest: bytes) -> None:
        """Bytes that came behind the handshake heads: the pumps pass them first, gated."""
        self._first = {"up": client_rest, "down": upstream_rest}

    def pumps(
        self, tun: Tunnel, client: trio.abc.Stream, upstream: trio.abc.Stream, allow_splice: bool
    ) -> tuple[Pump, Pump]:
        """One frame-reading pump per direction (the relay's `_pumps` hook)."""
        up = _Way("up", self.up, upstream)
        down = _Way("down", self.down, client)
        self.ways = {"up": up, "down": down}
        pumps: tuple[_Pump, _Pump]
        if (
            allow_splice
            and _HAVE_SPLICE
            and isinstance(client, trio.SocketStream)
            and isinstance(upstream, trio.SocketStream)
        ):
            tun.stats.path = "splice+frames"
            pumps = (
                partial(_pump_splice, self, tun, up, client, upstream),
                partial(_pump_splice, self, tun, down, upstream, client),
            )
        else:
            tun.stats.path = "portable+frames"
            pumps = (
                partial(_pump_portable, self, tun, up, client, upstream),
                partial(_pump_portable, self, tun, down, upstream, client),
            )
        return partial(self._run, tun, up, pumps[0]), partial(self._run, tun, down, pumps[1])

    def count(self) -> None:
        """Add the messages let through since the last call to the route's metric; a relay
        calls it as it goes (per read, not per message), so the metric moves while a tunnel
        is open."""
        reported = self._reported
        if up := self.up.messages - reported[0]:
            reported[0] += up
            self._counters[0].inc(up)
        if down := self.down.messages - reported[1]:
            reported[1] += down
            self._counters[1].inc(down)

    def report(self, rec: ExchangeRecord) -> None:
        """Fill the tunnel's log line and count a policy close, once the tunnel has ended."""
        rec.messages_in, rec.messages_out = self.up.messages, self.down.messages
        self.count()
        violation = self.violation or self.up.violation or self.down.violation
        if violation is not None:
            rec.error = str(violation)
            self.telemetry.websocket_closed(self.route, violation.code)

    async def _run(self, tun: Tunnel, way: _Way, pump: _Pump) -> None:
        """Run `pump` for `way`; a halted pump waits here for the tunnel to end, so the relay
        neither half-closes its destination nor calls it the side that closed first."""
        try:
            with way.scope:
                first = self._first.pop(way.direction, b"")
                if first:
                    tun.touch()
                    if await self._pass(tun, way, first):
                        return await self._halt(way)
                violation = await pump()
                if violation is None and not way.gate.stopped and self.violation is None:
                    way.ended = True
                    way.halted.set()
                    return None  # end of stream: the relay half-closes `dst`
        finally:
            self.count()
        return await self._halt(way)

    async def _halt(self, way: _Way) -> None:
        way.halted.set()
        await trio.sleep_forever()

    async def _pass(self, tun: Tunnel, way: _Way, data: bytes) -> bool:
        """Gate `data`, send what may go on; True when this direction must stop here."""
        forward, violation = way.gate.feed(data)
        if forward:
            await way.dst.send_all(forward)
            tun.moved(way.direction, len(forward))
        if violation is not None:
            await self._violated(tun, way, violation)
            return True
        return way.gate.stopped

    async def _violated(self, tun: Tunnel, way: _Way, violation: Violation) -> None:
        """Stop the other direction on a frame boundary, send both Close frames, end it all."""
        if self.violation is not None:
            return  # the other direction found one first and is closing the tunnel
        self.violation = violation
        tun.finished("policy")
        other = self.ways["down" if way.direction == "up" else "up"]
        other.gate.stop()
        if other.gate.stopped and other.waiting:
            other.scope.cancel()
        with trio.move_on_after(_CLOSE_GRACE):
            await other.halted.wait()
        if not other.halted.is_set():  # the frame under way did not finish: no Close that way
            other.scope.cancel()
            await other.halted.wait()
        # `other` carries bytes to the offender, `way` to the side that did nothing wrong.
        if other.gate.at_boundary and not other.gate.closed and not other.ended:
            await _send_close(other, violation.code, violation.rule)
        if not way.gate.closed:
            await _send_close(way, CLOSE_GOING_AWAY, "going away")
        # Closing a socket with unread bytes resets the connection, and a reset drops what
        # the peer has not read yet (the messages before the violation among them): send a
        # FIN and read until the peer closes too, within the grace.
        with trio.move_on_after(_CLOSE_GRACE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_linger, other.dst, name="websocket close: offender")
                nursery.start_soon(_linger, way.dst, name="websocket close: other side")
        tun.cancel()


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close `stream` and discard what it still brings until its peer closes."""
    if await _half_close(stream):
        with contextlib.suppress(*STREAM_ERRORS):
            while await stream.receive_some(65536):
                pass


async def _send_close(way: _Way, code: int, reason: str) -> None:
    """Write a Close frame down `way` within the grace; a peer that does not take it in time,
    or is gone, just gets the TCP close."""
    mask = os.urandom(4) if way.direction == "up" else None
    data = close_frame(code, reason, mask=mask)
    with trio.move_on_after(_CLOSE_GRACE), contextlib.suppress(*STREAM_ERRORS):
        await way.dst.send_all(data)


# --- portable path: every byte through Python -------------------------------------------


async def _pump_portable(
    ft: FramedTunnel, tun: Tunnel, way: _Way, src: trio.abc.Stream, dst: trio.abc.Stream
) -> Violation | None:
    """Copy until EOF or a stop; returns the violation that stopped it, if any."""
    gate = way.gate
    while True:
        way.waiting = gate.at_boundary
        try:
            data = await src.receive_some(tun.buffer_size)
        finally:
            way.waiting = False
        if not data:
            return None
        tun.touch()
        forward, violation = gate.feed(data)
        if forward:
            await dst.send_all(forward)
            tun.moved(way.direction, len(forward))
        if violation is not None:
            await ft._violated(tun, way, violation)
            return violation
        if gate.stopped:
            return None
        ft.count()


# --- splice path: headers through Python, long payloads in the kernel --------------------


async def _pump_splice(
    ft: FramedTunnel, tun: Tunnel, way: _Way, src: trio.SocketStream, dst: trio.SocketStream
) -> Violation | None:
    """Read headers (and short frames) into Python, splice long payloads in exact lengths."""
    src_fd, dst_fd = src.socket.fileno(), dst.socket.fileno()
    gate = way.gate
    direction = way.direction
    pipe: tuple[int, int] | None = None
    pipe_size = max(tun.buffer_size, _BULK_PIPE_SIZE)
    want = _SMALL_READ
    try:
        while True:
            left = gate.payload_left
            if left >= _SPLICE_MIN:
                if pipe is None:
                    pipe = _open_pipe(pipe_size)
                try:
                    n = os.splice(src_fd, pipe[1], min(left, pipe_size), flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    # Nothing to read: hand the pipe back while we wait (see relay.py).
                    _close_pipe(pipe)
                    pipe = None
                    await trio.lowlevel.wait_readable(src_fd)
                    continue
                if n == 0:
                    return None  # EOF mid-frame: the relay half-closes, the peer sees it
                gate.passed(n)
                await _drain_pipe(tun, direction, pipe[0], dst_fd, n)
                if gate.stopped:
                    return None
                await trio.lowlevel.checkpoint()  # one hot tunnel must not starve the rest
                continue
            way.waiting = gate.at_boundary
            try:
                await trio.lowlevel.wait_readable(src_fd)
            finally:
                way.waiting = False
            try:
                data = os.read(src_fd, want)
            except BlockingIOError:
                continue
            if not data:
                return None
            want = _BULK_READ if len(data) == want else _SMALL_READ
            tun.touch()
            forward, violation = gate.feed(data)
            if forward:
                try:
                    sent = os.write(dst_fd, forward)
                except BlockingIOError:
                    sent = 0
                if sent:
                    tun.moved(direction, sent)
                if sent < len(forward):
                    await write_all(tun, direction, dst_fd, bytes(forward[sent:]))
            if violation is not None:
                await ft._violated(tun, way, violation)
                return violation
            if gate.stopped:
                return None
            ft.count()
    finally:
        if pipe is not None:
            _close_pipe(pipe)
