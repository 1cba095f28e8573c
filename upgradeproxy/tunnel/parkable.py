"""A tunnel that can park: runs of its pumps that end either with the tunnel or, when the
waiter asks, with it parked, and the first read after a parked spell, done by the waiter.

Parkable: plain TCP on both sides (the splice path). A TLS side keeps state above the socket
(records decrypted but not yet read) that a readable-socket wait cannot see, so TLS tunnels
keep running as before.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Final

import trio

from upgradeproxy.transport.streams import STREAM_ERRORS
from upgradeproxy.tunnel.relay import SMALL, only_cancelled, pump_splice, write_all
from upgradeproxy.tunnel.state import Direction, FdPump, Session, Tunnel, Waiter

__all__ = ["OVER", "RUN", "STAY", "close_sockets", "make_parkable", "relay_ready", "run_parkable"]


def make_parkable(
    tun: Tunnel,
    client: socket.socket,
    upstream: socket.socket,
    parking: Waiter,
    session: Session,
    pump: FdPump = pump_splice,
) -> None:
    """Give `tun` its two sockets, its waiter, the session that ends it and its pump."""
    tun.client, tun.upstream = client, upstream
    tun.parking, tun.session, tun.pump = parking, session, pump
    tun.stats.path = "splice"


async def run_parkable(tun: Tunnel) -> bool:
    """Run the tunnel's pumps until it ends (False: its sockets are closed, `first_close` set)
    or it parks (True: its pumps stopped with nothing in hand; the caller hands it over)."""
    parking, ending = tun.parking, tun.ending
    assert parking is not None
    parked = False
    try:
        while True:
            scope = ending.scope = trio.CancelScope(deadline=tun.due_at())
            tun.seen = -1  # the waiter's first look after this only takes note
            parking.running.add(tun)
            try:
                # The pumps wait in trio checkpoints, so the scope ends either when it is due.
                with scope:
                    async with trio.open_nursery() as nursery:
                        tun.abort_scope = nursery.cancel_scope
                        # One direction runs in this task, the other in one child: two tasks
                        # a running tunnel, not three (each costs about 2 KiB).
                        if tun.up_open and tun.down_open:
                            nursery.start_soon(_direction, tun, "down", name="tunnel down")
                        await _direction(tun, "up" if tun.up_open else "down")
            finally:
                parking.running.discard(tun)
                ending.scope = tun.abort_scope = None
            wants_park, tun.wants_park = tun.wants_park, False
            if tun.failed or not (tun.up_open or tun.down_open):
                return False
            if not scope.cancelled_caught:  # a direction that ended cancelled the other
                return False
            if ending.due():
                tun.finished(ending.why)
                return False
            if not wants_park or trio.current_time() >= tun.deadline:
                tun.finished("idle")
                return False
            if tun.held_up or tun.held_down:
                continue  # bytes came in as the pumps stopped: run again, they go first
            parked = True
            return True
    except BaseException as exc:  # noted and re-raised: a drain must see its Cancelled
        tun.finished("cancelled" if only_cancelled(exc) else "error")
        raise
    finally:
        if not parked:
            close_sockets(tun)


async def _direction(tun: Tunnel, direction: Direction) -> None:
    """Run one direction to EOF and half-close its destination; an error aborts the tunnel."""
    src, dst = (tun.client, tun.upstream) if direction == "up" else (tun.upstream, tun.client)
    assert src is not None
    assert dst is not None
    assert tun.pump is not None
    dst_fd = dst.fileno()
    try:
        if held := _take_held(tun, direction):
            await write_all(tun, direction, dst_fd, held)
        await tun.pump(tun, direction, src.fileno(), dst_fd)
    except STREAM_ERRORS:
        tun.failed = True
        tun.finished("error")
        tun.cancel()
        return
    _direction_done(tun, direction)


def _take_held(tun: Tunnel, direction: Direction) -> bytes:
    if direction == "up":
        held, tun.held_up = tun.held_up, b""
    else:
        held, tun.held_down = tun.held_down, b""
    return held


def _direction_done(tun: Tunnel, direction: Direction) -> None:
    """One way reached EOF: pass the FIN on (rule 5: the other way keeps flowing)."""
    tun.finished("client" if direction == "up" else "upstream")
    if direction == "up":
        tun.up_open, dst = False, tun.upstream
    else:
        tun.down_open, dst = False, tun.client
    assert dst is not None
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


# What `relay_ready` leaves to the waiter.
STAY: Final = 0  # all relayed: the tunnel stays parked
RUN: Final = 1  # more than a read's worth, or a destination that is full: the pumps take over
OVER: Final = 2  # the tunnel ended (`first_close` is set)


def relay_ready(tun: Tunnel, fd: int) -> int:
    """Parked `tun`'s source `fd` turned ready: relay what it holds now, as a pump's step
    would (one read, one write), so a message to a parked tunnel waits for no extra trip
    through the scheduler and light traffic never brings the tasks back.

    Only for the byte splice: a tunnel with a pump of its own (one that reads frames, say)
    gets its pumps back instead, so that every byte goes through that pump."""
    if tun.pump is not pump_splice:
        return RUN
    client, upstream = tun.client, tun.upstream
    assert client is not None
    assert upstream is not None
    direction: Direction = "up" if fd == client.fileno() else "down"
    dst = upstream if direction == "up" else client
    try:
        data = os.read(fd, SMALL)
        if not data:
            _direction_done(tun, direction)
            return STAY if tun.up_open or tun.down_open else OVER
        try:
            sent = os.write(dst.fileno(), data)
        except BlockingIOError:
            sent = 0
    except BlockingIOError:
        return STAY
    except OSError:
        tun.failed = True
        tun.finished("error")
        return OVER
    if sent:
        tun.moved(direction, sent)
    if sent < len(data):
        tun.hold(direction, memoryview(data)[sent:])
        return RUN
    return RUN if len(data) == SMALL else STAY


def close_sockets(tun: Tunnel) -> None:
    """Close both sockets of a tunnel that is over."""
    for sock in (tun.client, tun.upstream):
        if sock is not None:
            sock.close()
