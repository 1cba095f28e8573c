"""The pumps of a tunnel whose WebSocket frames are read (contract rule 18), and its
close-down on a violation: one of each for every runner (`run_tunnel` with a `FrameRelay`,
and a parkable tunnel's `pump_frames`), both in tunnel/websocket.py.

On raw sockets under Linux a payload the gate has vouched for is spliced in the kernel in
exact lengths, so bulk never enters Python; the headers (and small frames) are read into
Python, 16 KiB at first, more while reads come back full. Elsewhere every byte is copied.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Final, Protocol

import trio

from upgradeproxy.rules.websocket_frames import (
    CLOSE_GOING_AWAY,
    Buffer,
    FrameGate,
    Violation,
    close_frame,
)
from upgradeproxy.transport.streams import STREAM_ERRORS
from upgradeproxy.tunnel.relay import (
    BULK_PIPE_SIZE,
    SMALL,
    SPLICE_FLAGS,
    close_pipe,
    drain_pipe,
    half_close,
    open_pipe,
    write_all,
)
from upgradeproxy.tunnel.state import Direction, Tunnel

__all__ = ["FrameState", "Way", "close_down", "halt", "pump_portable", "pump_splice"]

# How long the other direction may take to finish the frame under way, and a Close frame to
# be written, before the tunnel closes without it.
_CLOSE_GRACE: Final = 1.0
# Reads into Python start small (one message of a chat is a few hundred bytes) and grow to
# a pipe's worth while each read fills up: bulk of short frames then costs one read per
# 256 KiB, not per 16 KiB (measured: 2.6 -> 1.1 ms of CPU per MB of 16 KiB frames).
_SMALL_READ: Final = SMALL
_BULK_READ: Final = BULK_PIPE_SIZE
# What is left of a frame's payload is spliced when it is at least this long; shorter ones
# ride along with the headers in those reads (splicing 16 KiB frames one by one cost more).
_SPLICE_MIN: Final = _BULK_READ


class FrameState(Protocol):
    """What the pumps use of a tunnel's frame state (tunnel/websocket.py's FramedTunnel)."""

    violation: Violation | None
    ways: dict[str, Way]

    def count(self) -> None:
        """Add the messages let through so far to the route's metric."""


class Way:
    """One direction while the pumps run: its gate, where its bytes go, its own cancel scope
    (to stop it while it waits for bytes on a frame boundary) and whether it has ended or
    halted. `dst` is a trio stream (`run_tunnel`) or, on a parkable tunnel, the socket whose
    descriptor the pump writes to."""

    __slots__ = (
        "direction", "dst", "dst_fd", "ended", "gate", "halted", "scope", "waiting",
    )  # fmt: skip

    def __init__(
        self,
        direction: Direction,
        gate: FrameGate,
        dst: trio.abc.Stream | socket.socket,
        *,
        ended: bool = False,
    ) -> None:
        self.direction = direction
        self.gate = gate
        self.dst = dst
        self.dst_fd = dst.fileno() if isinstance(dst, socket.socket) else -1
        self.scope = trio.CancelScope()
        self.waiting = False  # in a receive, at a point where cancelling loses nothing
        self.halted = trio.Event()  # stopped on a boundary, or ended
        self.ended = ended  # its source ended: the relay half-closes `dst`
        if ended:
            self.halted.set()

    def stream(self) -> trio.abc.Stream:
        """`dst` as a trio stream: a parkable tunnel's socket is wrapped only for a close-down."""
        dst = self.dst
        if isinstance(dst, socket.socket):
            dst = self.dst = trio.SocketStream(trio.socket.from_stdlib_socket(dst))
        return dst

    async def send(self, tun: Tunnel, data: Buffer) -> None:
        """Send bytes the gate let through, and count them."""
        if self.dst_fd >= 0:
            await write_all(tun, self.direction, self.dst_fd, bytes(data))
        else:
            await self.stream().send_all(data)
            tun.moved(self.direction, len(data))


async def halt(way: Way) -> None:
    """`way` stopped on a boundary: wait for the tunnel's end (the relay must not half-close)."""
    way.halted.set()
    await trio.sleep_forever()


async def close_down(ft: FrameState, tun: Tunnel, way: Way, violation: Violation) -> None:
    """`way`'s gate found `violation`: stop the other direction on a frame boundary, send both
    Close frames, end the tunnel. Every runner's pumps call it, in the offending way's task."""
    if ft.violation is not None:
        return  # the other direction found one first and is closing the tunnel
    ft.violation = violation
    tun.finished("policy")
    # Bytes are on their way out until the tunnel ends: the waiter must not park it meanwhile.
    tun.writing += 1
    try:
        other = ft.ways["down" if way.direction == "up" else "up"]
        other.gate.stop()
        if other.gate.stopped and other.waiting:
            other.scope.cancel()
        with trio.move_on_after(_CLOSE_GRACE):
            await other.halted.wait()
        if not other.halted.is_set():  # the frame under way did not finish: no Close that way
            other.scope.cancel()
            # Bounded: a parkable tunnel's pump still writing bytes from before a parked
            # spell has not entered the scope yet.
            with trio.move_on_after(_CLOSE_GRACE):
                await other.halted.wait()
        # `other` carries bytes to the offender, `way` to the side that did nothing wrong.
        gate = other.gate
        if other.halted.is_set() and gate.at_boundary and not gate.closed and not other.ended:
            await _send_close(other, violation.code, violation.rule)
        if not way.gate.closed:
            await _send_close(way, CLOSE_GOING_AWAY, "going away")
        # Closing a socket with unread bytes resets the connection, and a reset drops what
        # the peer has not read yet (the messages before the violation among them): send a
        # FIN and read until the peer closes too, within the grace.
        with trio.move_on_after(_CLOSE_GRACE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_linger, other.stream(), name="websocket close: offender")
                nursery.start_soon(_linger, way.stream(), name="websocket close: other side")
    finally:
        tun.writing -= 1
    tun.cancel()


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close `stream` and discard what it still brings until its peer closes."""
    if await half_close(stream):
        with contextlib.suppress(*STREAM_ERRORS):
            while await stream.receive_some(65536):
                pass


async def _send_close(way: Way, code: int, reason: str) -> None:
    """Write a Close frame down `way` within the grace; a peer that does not take it in time,
    or is gone, just gets the TCP close."""
    mask = os.urandom(4) if way.direction == "up" else None
    data = close_frame(code, reason, mask=mask)
    with trio.move_on_after(_CLOSE_GRACE), contextlib.suppress(*STREAM_ERRORS):
        await way.stream().send_all(data)


# --- portable path: every byte through Python -------------------------------------------


async def pump_portable(
    ft: FrameState, tun: Tunnel, way: Way, src: trio.abc.Stream, dst: trio.abc.Stream
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
            await close_down(ft, tun, way, violation)
            return violation
        if gate.stopped:
            return None
        ft.count()


# --- splice path: headers through Python, long payloads in the kernel --------------------


async def pump_splice(
    ft: FrameState, tun: Tunnel, way: Way, src_fd: int, dst_fd: int
) -> Violation | None:
    """Read headers (and short frames) into Python, splice long payloads in exact lengths.

    What a parkable pump must be (tunnel/state.py, `FdPump`): it waits for input only in
    `wait_readable(src_fd)`, and a cancel while it writes hands what it holds to `tun.hold`
    (`write_all`, `drain_pipe`); the gate keeps its place in a frame, and a header split
    across reads, through a parked spell."""
    gate = way.gate
    direction = way.direction
    pipe: tuple[int, int] | None = None
    pipe_size = max(tun.buffer_size, BULK_PIPE_SIZE)
    want = _SMALL_READ
    try:
        while True:
            left = gate.payload_left
            if left >= _SPLICE_MIN:
                if pipe is None:
                    pipe = open_pipe(pipe_size)
                try:
                    n = os.splice(src_fd, pipe[1], min(left, pipe_size), flags=SPLICE_FLAGS)
                except BlockingIOError:
                    # Nothing to read: hand the pipe back while we wait (see relay.py).
                    close_pipe(pipe)
                    pipe = None
                    await trio.lowlevel.wait_readable(src_fd)
                    continue
                if n == 0:
                    return None  # EOF mid-frame: the relay half-closes, the peer sees it
                gate.passed(n)
                await drain_pipe(tun, direction, pipe[0], dst_fd, n)
                if gate.stopped:
                    return None
                await trio.lowlevel.checkpoint()  # one hot tunnel must not starve the rest
                continue
            way.waiting = gate.at_boundary
            try:
                await trio.lowlevel.wait_readable(src_fd)
            finally:
                way.waiting = False
            if tun.wants_park:
                # The waiter asked the tunnel to park as this read came due: leave the bytes
                # for the next run rather than read a violation that could not be closed.
                await trio.lowlevel.checkpoint()
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
                await close_down(ft, tun, way, violation)
                return violation
            if gate.stopped:
                return None
            ft.count()
    finally:
        if pipe is not None:
            close_pipe(pipe)
