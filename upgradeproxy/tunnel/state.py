"""A tunnel's state, kept across its runs and its parked spells (see tunnel/parking.py)."""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

__all__ = ["Direction", "Ending", "FdPump", "OnBytes", "Session", "Tunnel", "TunnelStats", "Waiter"]

Direction = Literal["up", "down"]  # up = client->upstream, down = upstream->client
OnBytes = Callable[[Direction, int], None]
# A pump over descriptors: (tunnel, direction, src fd, dst fd); what a parkable tunnel runs.
# It moves bytes until EOF, waits for input only in trio.lowlevel.wait_readable(src) with
# nothing in hand, and on a cancel while waiting to write hands its bytes to `Tunnel.hold`.
FdPump = Callable[["Tunnel", Direction, int, int], Awaitable[None]]


@dataclass(slots=True)
class TunnelStats:
    """Counters of one tunnel, filled in place so a cancelled caller still sees them.

    Byte counts add to what the caller put in (e.g. the h11 trailing data it already sent).
    """

    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    # "client" | "upstream" | "idle" | "error" | "cancelled", or an `Ending`'s reason
    first_close: str = ""
    path: str = ""  # "splice" | "portable"
    duration: float = 0.0


@dataclass(slots=True, eq=False)
class Ending:
    """A planned close of one tunnel (lifetime, spread drain) at `deadline`, which may be set
    before or while the tunnel runs, or while it is parked; `why` becomes its `first_close`.

    `scope` is the running tunnel's one deadline scope (None between runs): it also carries the
    idle deadline (whichever comes first), so a tunnel enters one scope, not two. While the
    tunnel is parked, `parked` is its record, whose waiter keeps the deadline instead.
    """

    scope: trio.CancelScope | None = None
    deadline: float = math.inf
    why: str = ""
    parked: Tunnel | None = None

    def at(self, deadline: float, why: str) -> None:
        """Close by `deadline`; an earlier plan stands."""
        if deadline < self.deadline:
            self.deadline = deadline
            self.why = why
            if self.scope is not None:
                self.scope.deadline = min(self.scope.deadline, deadline)
            if self.parked is not None and self.parked.parking is not None:
                self.parked.parking.replan(self.parked)

    def due(self) -> bool:
        """Whether the planned close (not the idle deadline) is what came due."""
        return self.deadline <= trio.current_time()


class Waiter(Protocol):
    """The process's waiter for parked tunnels (tunnel/parking.py), as a tunnel sees it."""

    running: set[Tunnel]

    def replan(self, tun: Tunnel) -> None:
        """A parked tunnel's planned end moved earlier."""


class Session(Protocol):
    """What runs a tunnel and writes its line when it ends (tunnel/session.py's Switched)."""

    async def resume(self) -> None:
        """Run the tunnel again after a parked spell, in the waiter's nursery."""

    def end_parked(self) -> None:
        """End the tunnel now, while nothing runs it (its `first_close` is set)."""


class Tunnel:
    """One tunnel's state across its runs and parked spells: stats, deadlines, and (on a
    parkable tunnel) its two sockets, which directions are still open and bytes in hand."""

    __slots__ = (
        "abort_scope",
        "buffer_size",
        "client",
        "deadline",
        "down_open",
        "ending",
        "entry",
        "failed",
        "held_down",
        "held_up",
        "idle_slack",
        "idle_timeout",
        "on_bytes",
        "parking",
        "pump",
        "seen",
        "session",
        "stats",
        "up_open",
        "upstream",
        "wants_park",
        "writing",
    )

    def __init__(
        self,
        stats: TunnelStats,
        idle_timeout: float,
        buffer_size: int,
        on_bytes: OnBytes | None,
        ending: Ending,
    ) -> None:
        self.stats = stats
        self.idle_timeout = idle_timeout
        self.buffer_size = buffer_size
        self.on_bytes = on_bytes
        self.ending = ending
        # One scope for the whole tunnel whose deadline each transfer pushes forward: no
        # watchdog task, and an idle tunnel costs nothing but a deadline entry.
        # Moving a trio deadline re-files it in the run loop's heap, which costs more than the
        # copy of a small message: the deadline is set 1% past the timeout and moved only once
        # it lags by that much. An idle tunnel so closes between tunnel_idle and 1% later
        # (36 s of an hour, 10 ms of a second), never early.
        self.idle_slack = idle_timeout / 100
        self.deadline = trio.current_time() + idle_timeout + self.idle_slack  # the idle one
        self.abort_scope: trio.CancelScope | None = None
        self.failed = False
        # Parking (tunnel/parking.py): set by `parkable`, unused on other tunnels.
        self.client: socket.socket | None = None
        self.upstream: socket.socket | None = None
        self.up_open = self.down_open = True
        self.held_up = self.held_down = b""  # read, not yet written when a park stopped a pump
        self.parking: Waiter | None = None
        self.session: Session | None = None
        self.pump: FdPump | None = None  # set by whoever makes the tunnel parkable
        self.wants_park = False  # the waiter asked the running pumps to stop
        self.seen = -1  # bytes moved when the waiter last looked
        self.writing = 0  # pumps waiting for their destination to take bytes
        self.entry: tuple[float, Tunnel] | None = None  # the waiter's heap entry

    def __lt__(self, other: Tunnel) -> bool:
        """Any order, so heap entries (when, tunnel) with equal `when` compare."""
        return id(self) < id(other)

    def touch(self) -> None:
        """Record activity: the tunnel is not idle."""
        deadline = trio.current_time() + self.idle_timeout + self.idle_slack
        if deadline - self.deadline > self.idle_slack:
            self.deadline = deadline
            scope = self.ending.scope
            if scope is not None:
                scope.deadline = min(deadline, self.ending.deadline)

    def moved(self, direction: Direction, n: int) -> None:
        """Count `n` bytes accepted by the destination."""
        if direction == "up":
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n
        if self.on_bytes is not None:
            self.on_bytes(direction, n)
        self.touch()

    def finished(self, why: str) -> None:
        """Note why the tunnel started to end, unless something already did."""
        if not self.stats.first_close:
            self.stats.first_close = why

    def due_at(self) -> float:
        """When the tunnel ends if no byte moves: idle, or its planned end."""
        return min(self.deadline, self.ending.deadline)

    def hold(self, direction: Direction, data: bytes | memoryview) -> None:
        """Keep bytes a stopped pump had read but not written; the next run writes them first."""
        if direction == "up":
            self.held_up += data
        else:
            self.held_down += data

    def cancel(self) -> None:
        """Stop the tunnel's pumps (an error, or a direction that cannot half-close)."""
        if self.abort_scope is not None:
            self.abort_scope.cancel()
