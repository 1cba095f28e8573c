"""The byte splice that runs after a `101 Switching Protocols` has been relayed (contract rule 5).

Two paths: `splice` moves bytes socket -> kernel pipe -> socket with `os.splice` so the payload
never enters Python (Linux, plain TCP on both sides); `portable` copies through Python and works
for any `trio.abc.Stream` (TLS, memory streams, other platforms).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final, Protocol

import trio

from upgradeproxy.transport.streams import STREAM_ERRORS
from upgradeproxy.tunnel.state import Direction, Ending, OnBytes, Tunnel, TunnelStats

__all__ = [
    "BULK_PIPE_SIZE", "HAVE_SPLICE", "SMALL", "SPLICE_FLAGS", "Direction", "Ending",
    "FrameRelay", "Pump", "TunnelStats", "close_pipe", "drain_pipe", "half_close",
    "only_cancelled", "open_pipe", "pump_splice", "run_tunnel", "write_all",
]  # fmt: skip

Pump = Callable[[], Awaitable[None]]


class FrameRelay(Protocol):
    """Pumps that read what they relay (tunnel/websocket.py), in place of the byte splice."""

    def pumps(
        self, tun: Tunnel, client: trio.abc.Stream, upstream: trio.abc.Stream, allow_splice: bool
    ) -> tuple[Pump, Pump]: ...


HAVE_SPLICE: Final = hasattr(os, "splice")
SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# A splice loop whose sockets are always ready never reaches a checkpoint on its own; yield after
# this many transfers in a row so one hot tunnel cannot starve the others (or ignore a cancel).
# Counted in pipe-fulls of BULK_PIPE_SIZE: one yield per 256 KiB, as often as every 4 x 64 KiB.
_YIELD_EVERY: Final = 1
# Upper bound on a graceful close (e.g. a TLS close_notify to a peer that stopped reading).
_CLOSE_GRACE: Final = 1.0
_DEFAULT_PIPE_SIZE: Final = 65536
# Bytes read into Python before a pipe is worth it: a message shorter than this is copied
# with read/write (3 syscalls) instead of a pipe's pipe2/splice/splice/close (6+), which
# decides WebSocket round-trip latency; a full read means bulk, and bulk goes to a pipe.
SMALL: Final = 16384
# Kernel pipe for bulk: 64 KiB splices cost as much per call as 256 KiB ones, so a bigger
# pipe is most of the throughput; it exists only while a burst lasts (see pump_splice).
BULK_PIPE_SIZE: Final = 262144


async def run_tunnel(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    *,
    idle_timeout: float,
    buffer_size: int = 65536,
    on_bytes: OnBytes | None = None,
    stats: TunnelStats | None = None,
    allow_splice: bool = True,
    ending: Ending | None = None,
    frames: FrameRelay | None = None,
) -> TunnelStats:
    """Splice `client` and `upstream` until both directions end, one fails, it goes idle, or
    `ending` comes due; `frames` relays instead (rule 18) and may end it too.

    Both streams are closed on return. Outside cancellation closes them and propagates.
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be positive, got {buffer_size}")
    stats = stats if stats is not None else TunnelStats()
    ending = ending if ending is not None else Ending()
    tun = Tunnel(stats, idle_timeout, buffer_size, on_bytes, ending)
    if frames is None:
        up, down = _pumps(tun, client, upstream, allow_splice)
    else:
        up, down = frames.pumps(tun, client, upstream, allow_splice)
    started = trio.current_time()
    graceful = False
    scope = ending.scope = trio.CancelScope(deadline=tun.due_at())
    try:
        # Both paths wait in trio checkpoints, so the scope ends either when it is due.
        with scope:
            async with trio.open_nursery() as nursery:
                tun.abort_scope = nursery.cancel_scope
                nursery.start_soon(_direction, tun, "up", up, upstream, name="tunnel up")
                nursery.start_soon(_direction, tun, "down", down, client, name="tunnel down")
        if scope.cancelled_caught:
            tun.finished(ending.why if ending.due() else "idle")
        graceful = not tun.failed
    except BaseException as exc:  # noted and re-raised: graceful drain must see its Cancelled
        tun.finished("cancelled" if only_cancelled(exc) else "error")
        raise
    finally:
        ending.scope = None
        stats.duration = trio.current_time() - started
        await _close(client, graceful)
        await _close(upstream, graceful)
    return stats


def _pumps(
    tun: Tunnel, client: trio.abc.Stream, upstream: trio.abc.Stream, allow_splice: bool
) -> tuple[Pump, Pump]:
    """Pick the path for this tunnel and bind one pump per direction."""
    if (
        allow_splice
        and HAVE_SPLICE
        and isinstance(client, trio.SocketStream)
        and isinstance(upstream, trio.SocketStream)
    ):
        tun.stats.path = "splice"
        client_fd, upstream_fd = client.socket.fileno(), upstream.socket.fileno()
        return (
            partial(pump_splice, tun, "up", client_fd, upstream_fd),
            partial(pump_splice, tun, "down", upstream_fd, client_fd),
        )
    tun.stats.path = "portable"
    return (
        partial(_pump_portable, tun, "up", client, upstream),
        partial(_pump_portable, tun, "down", upstream, client),
    )


async def _direction(tun: Tunnel, direction: Direction, pump: Pump, dst: trio.abc.Stream) -> None:
    """Run one direction to EOF and half-close `dst`; a stream error aborts the whole tunnel."""
    try:
        await pump()
    except STREAM_ERRORS:
        tun.failed = True
        tun.finished("error")
        tun.cancel()
        return
    tun.finished("client" if direction == "up" else "upstream")
    # Propagate the FIN instead of tearing the tunnel down, so the other way keeps flowing
    # (the bug in golang/go#35892). A `dst` that cannot half-close (TLS: trio has no
    # close_notify-and-keep-reading) ends the whole tunnel gracefully instead, as Go does
    # since golang/go#72140: otherwise its peer would wait for an EOF until tunnel_idle.
    if not await half_close(dst):
        tun.cancel()


async def half_close(stream: trio.abc.Stream) -> bool:
    """Send EOF on `stream`; False if it cannot half-close. Failing to is not a tunnel error."""
    if type(stream) is trio.SocketStream:
        # What its send_eof does, minus the checkpoint: a trip through the scheduler per
        # direction of every tunnel that ends.
        if not stream.socket.did_shutdown_SHUT_WR:
            with contextlib.suppress(OSError):
                stream.socket.shutdown(socket.SHUT_WR)
        return True
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return False
    with contextlib.suppress(*STREAM_ERRORS):
        await stream.send_eof()
    return True


async def _close(stream: trio.abc.Stream, graceful: bool) -> None:
    """Close `stream`: politely within a bound, or at once after an error or a cancel."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()  # what its aclose does, minus the checkpoint and scopes
        return
    deadline = trio.current_time() + _CLOSE_GRACE if graceful else -math.inf
    # Shielded so a drain's cancel cannot skip the close; trio's aclose still closes when the
    # scope's own deadline cancels it.
    with trio.CancelScope(deadline=deadline, shield=True), contextlib.suppress(*STREAM_ERRORS):
        await stream.aclose()


def only_cancelled(exc: BaseException) -> bool:
    """True if `exc` is a Cancelled, or a group holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


# --- portable path -------------------------------------------------------------------------


async def _pump_portable(
    tun: Tunnel, direction: Direction, src: trio.abc.Stream, dst: trio.abc.Stream
) -> None:
    """Copy until EOF, one buffer at a time, so a slow `dst` holds back reads from `src`."""
    # receive_some allocates only once data is ready, so an idle tunnel holds no buffer.
    while data := await src.receive_some(tun.buffer_size):
        tun.touch()
        await dst.send_all(data)
        tun.moved(direction, len(data))


# --- splice path ---------------------------------------------------------------------------


async def pump_splice(tun: Tunnel, direction: Direction, src_fd: int, dst_fd: int) -> None:
    """Move bytes socket -> pipe -> socket in the kernel until EOF; at most one pipe in flight."""
    pipe: tuple[int, int] | None = None
    streak = 0  # transfers in a row that never waited
    pipe_size = max(tun.buffer_size, BULK_PIPE_SIZE)
    try:
        while True:
            if pipe is None:
                # Created only once a burst is under way, so an idle tunnel holds no pipe.
                await trio.lowlevel.wait_readable(src_fd)
                try:
                    data = os.read(src_fd, SMALL)
                except BlockingIOError:
                    continue
                if not data:
                    return  # EOF
                try:
                    # Inline: the common case (all of a small message accepted at once) then
                    # costs no coroutine; only a partial write goes the awaiting way.
                    sent = os.write(dst_fd, data)
                except BlockingIOError:
                    sent = 0
                if sent:
                    tun.moved(direction, sent)
                if sent < len(data):
                    await write_all(tun, direction, dst_fd, data[sent:])
                if len(data) < SMALL:
                    continue
                pipe = open_pipe(pipe_size)
            try:
                n = os.splice(src_fd, pipe[1], pipe_size, flags=SPLICE_FLAGS)
            except BlockingIOError:
                # Nothing to read and the pipe is empty: hand it back rather than pin 2 fds and
                # pipe pages per quiet tunnel (the per-user pipe page budget is shared, see
                # fs.pipe-user-pages-soft). Measured: no throughput cost on a bulk transfer.
                close_pipe(pipe)
                pipe, streak = None, 0
                continue
            if n == 0:
                return  # EOF; the pipe is empty, every chunk is drained before the next
            waited = await drain_pipe(tun, direction, pipe[0], dst_fd, n)
            streak = 0 if waited else streak + 1
            if streak >= _YIELD_EVERY:
                streak = 0
                await trio.lowlevel.checkpoint()
    finally:
        if pipe is not None:
            close_pipe(pipe)


async def drain_pipe(tun: Tunnel, direction: Direction, pipe_r: int, dst_fd: int, n: int) -> bool:
    """Move exactly `n` bytes from the pipe to `dst_fd`; True if we had to wait for it."""
    waited = False
    while n:
        try:
            sent = os.splice(pipe_r, dst_fd, n, flags=SPLICE_FLAGS)
        except BlockingIOError:
            waited = True
            tun.touch()  # bytes arrived; a stalled writer is not an idle tunnel
            tun.writing += 1
            try:
                await trio.lowlevel.wait_writable(dst_fd)
            except trio.Cancelled:
                if tun.wants_park:  # the pipe's bytes go with the parked tunnel
                    tun.hold(direction, _read_pipe(pipe_r, n))
                raise
            finally:
                tun.writing -= 1
            continue
        if sent == 0:  # cannot happen with data in the pipe; never spin on it
            raise trio.BrokenResourceError("splice to socket made no progress")
        n -= sent
        tun.moved(direction, sent)
    return waited


async def write_all(tun: Tunnel, direction: Direction, dst_fd: int, data: bytes) -> None:
    """Write the rest of a small read to `dst_fd`, waiting while its send buffer is full."""
    view = memoryview(data)
    while view:
        try:
            sent = os.write(dst_fd, view)
        except BlockingIOError:
            tun.touch()  # bytes arrived; a stalled writer is not an idle tunnel
            tun.writing += 1
            try:
                await trio.lowlevel.wait_writable(dst_fd)
            except trio.Cancelled:
                if tun.wants_park:  # what is left goes with the parked tunnel
                    tun.hold(direction, view)
                raise
            finally:
                tun.writing -= 1
            continue
        view = view[sent:]
        tun.moved(direction, sent)


def _read_pipe(pipe_r: int, n: int) -> bytes:
    """The `n` bytes still in a pipe (a stopped transfer takes them along)."""
    chunks = []
    while n > 0:
        try:
            chunk = os.read(pipe_r, n)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def open_pipe(size: int) -> tuple[int, int]:
    """A non-blocking pipe, enlarged to `size` when the kernel allows."""
    import fcntl  # POSIX-only, and only the Linux splice path gets here

    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    if size > _DEFAULT_PIPE_SIZE:
        # Best effort: past fs.pipe-user-pages-soft the kernel refuses; a smaller pipe still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, size)
    return pipe_r, pipe_w


def close_pipe(pipe: tuple[int, int]) -> None:
    """Close both ends of a pipe."""
    for fd in pipe:
        os.close(fd)
