"""The waiter: one per process, it holds every parked tunnel in one epoll set of its own and one
heap of deadlines, in place of each tunnel's tasks and cancel scope.

A running parkable tunnel that moved no byte either way for a whole `park_after` interval
(between one and two intervals after its last byte) has its pumps stopped and is parked: its
sockets go into the waiter's epoll set, its end (idle from its last byte, lifetime, drain) into
the heap. When a side turns readable or hangs up, the waiter relays what is there at once and
starts the tunnel running again in its own nursery; when a deadline passes first, it ends the
tunnel there and then. Cancelling the waiter (the end of a drain) ends every parked tunnel.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import select
import socket
from collections.abc import Callable, Mapping
from typing import Final

import trio

from upgradeproxy.tunnel.parkable import OVER, STAY, relay_ready
from upgradeproxy.tunnel.state import Tunnel

__all__ = ["PARK_AFTER", "PARK_AFTER_ENV", "Parking", "park_after_from_env"]

log = logging.getLogger("upgradeproxy")

# Seconds with no byte either way before a tunnel parks (it parks within twice that). Short,
# because a running tunnel costs ~12 KiB: thousands connecting at once (after a deploy) run
# together only this long; a parked tunnel that gets a message stays parked, so chatty
# tunnels do not pay for it.
PARK_AFTER: Final = 0.5
PARK_AFTER_ENV: Final = "UPGRADEPROXY_PARK_AFTER"
# Readable (data, EOF) or hung up; EPOLLHUP and EPOLLERR are always reported.
_EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP
_BATCH: Final = 1024  # events taken per epoll_wait
_COMPACT_AT: Final = 1024  # stale heap entries before a rebuild is worth it


def park_after_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """`UPGRADEPROXY_PARK_AFTER` in seconds (0: never park), else `PARK_AFTER`."""
    raw = environ.get(PARK_AFTER_ENV, "")
    if not raw:
        return PARK_AFTER
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        log.warning("%s=%r is not a number of seconds; using %s", PARK_AFTER_ENV, raw, PARK_AFTER)
        return PARK_AFTER
    return value


class Parking:
    """The process's parked tunnels and the task that watches them."""

    def __init__(
        self, park_after: float = PARK_AFTER, on_count: Callable[[int], None] | None = None
    ) -> None:
        self.park_after = park_after
        self._on_count = on_count  # told how many are parked after each change
        self.running: set[Tunnel] = set()  # parkable tunnels whose pumps run: looked at in turn
        self.parked = 0
        # Indexed by descriptor: 8 bytes a socket where a dict takes about 50.
        self._by_fd: list[Tunnel | None] = []
        # (when, tunnel), the tunnel's `entry` while it is the live one: a tunnel woken or
        # re-planned leaves a stale entry behind, dropped when it comes up or at a rebuild.
        self._heap: list[tuple[float, Tunnel]] = []
        self._stale = 0
        self._epoll: select.epoll | None = None
        self._nursery: trio.Nursery | None = None
        self._sleep: trio.CancelScope | None = None

    @property
    def accepting(self) -> bool:
        """Whether tunnels may park here: parking is on and the waiter runs."""
        return self._nursery is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch parked tunnels until cancelled; resumed tunnels run in this task's nursery."""
        if self.park_after <= 0:
            task_status.started()
            return
        self._epoll = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timers, name="parked tunnels' deadlines")
                task_status.started()
                await self._watch(self._epoll.fileno())
        finally:
            self._nursery = None
            for tun in {tun for tun in self._by_fd if tun is not None}:
                self._end(tun, "cancelled")
            self._epoll.close()

    def park(self, tun: Tunnel) -> None:
        """Take `tun`, whose pumps stopped with nothing in hand, until a side is ready or it
        is due. Without a running waiter (the drain is over) the tunnel ends here."""
        epoll = self._epoll
        if self._nursery is None or epoll is None:
            tun.finished("cancelled")
            self._ended(tun)
            return
        by_fd = self._by_fd
        try:
            for sock, watched in ((tun.client, tun.up_open), (tun.upstream, tun.down_open)):
                if watched and sock is not None:
                    fd = sock.fileno()
                    epoll.register(fd, _EVENTS)
                    if fd >= len(by_fd):
                        by_fd.extend([None] * (fd + 1 - len(by_fd)))
                    by_fd[fd] = tun
        except OSError as exc:
            # No room in the epoll set (fs.epoll.max_user_watches): it keeps running instead.
            log.warning("cannot park a tunnel: %s", exc)
            for sock in (tun.client, tun.upstream):
                if sock is not None:
                    self._forget(sock.fileno(), tun)
            assert tun.session is not None
            self._nursery.start_soon(tun.session.resume, name="tunnel resumed")
            return
        tun.ending.parked = tun
        self.parked += 1
        if self._on_count is not None:
            self._on_count(self.parked)
        self._plan(tun)

    def replan(self, tun: Tunnel) -> None:
        """A parked tunnel's planned end moved earlier (a spread drain)."""
        self._plan(tun)

    def _plan(self, tun: Tunnel) -> None:
        if tun.entry is not None:
            self._stale += 1
        entry = tun.entry = (tun.due_at(), tun)
        heapq.heappush(self._heap, entry)
        if self._sleep is not None and entry[0] < self._sleep.deadline:
            self._sleep.deadline = entry[0]

    def _unpark(self, tun: Tunnel) -> None:
        """Forget `tun`'s descriptors and heap entry (before anything can close them)."""
        for sock in (tun.client, tun.upstream):
            if sock is not None:
                self._forget(sock.fileno(), tun)
        tun.ending.parked = None
        if tun.entry is not None:
            tun.entry = None
            self._stale += 1
        self.parked -= 1
        if self._on_count is not None:
            self._on_count(self.parked)

    def _forget(self, fd: int, tun: Tunnel) -> None:
        """Stop watching `fd` if it is one of `tun`'s."""
        if 0 <= fd < len(self._by_fd) and self._by_fd[fd] is tun:
            assert self._epoll is not None
            self._epoll.unregister(fd)
            self._by_fd[fd] = None

    async def _watch(self, epoll_fd: int) -> None:
        """Relay for parked tunnels as their sides turn ready: per message, the same steps as
        a running tunnel's pump (no scope, no timer), plus one epoll_wait per batch."""
        while True:
            await trio.lowlevel.wait_readable(epoll_fd)
            self._wake_ready()

    async def _timers(self) -> None:
        """End parked tunnels that are due, and look for running ones to park."""
        next_look = trio.current_time() + self.park_after
        while True:
            wake_at = min(next_look, self._heap[0][0]) if self._heap else next_look
            with trio.CancelScope(deadline=wake_at) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            self._expire(now)
            if now >= next_look:
                self._look()
                next_look = now + self.park_after
            if self._stale > _COMPACT_AT and 2 * self._stale > len(self._heap):
                self._compact()

    def _wake_ready(self) -> None:
        """Relay what parked tunnels' ready sides hold; resume those that need their pumps."""
        assert self._epoll is not None
        assert self._nursery is not None
        while True:
            events = self._epoll.poll(0, _BATCH)
            for fd, _ in events:
                tun = self._by_fd[fd]
                if tun is None:
                    continue  # its other side resumed or ended it in this batch
                try:
                    what = relay_ready(tun, fd)
                except Exception:
                    # A bug must cost this tunnel, never the waiter and every tunnel in it.
                    log.exception("unexpected error in a parked tunnel")
                    tun.finished("error")
                    what = OVER
                if what == STAY:
                    if not (tun.up_open if fd == _fileno(tun.client) else tun.down_open):
                        self._forget(fd, tun)  # that side sent its FIN: half-closed, parked
                    continue
                self._unpark(tun)
                if what == OVER:
                    self._ended(tun)
                    continue
                assert tun.session is not None
                self._nursery.start_soon(tun.session.resume, name="tunnel resumed")
            if len(events) < _BATCH:
                return

    def _expire(self, now: float) -> None:
        """End each parked tunnel whose idle timeout or planned end came."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            tun = entry[1]
            if tun.entry is not entry:
                self._stale -= 1
                continue
            due = tun.due_at()
            if due > now:  # bytes moved while it was parked: its idle end moved on
                entry = tun.entry = (due, tun)
                heapq.heappush(heap, entry)
                continue
            tun.entry = None
            ending = tun.ending
            self._end(tun, ending.why if ending.due() else "idle")

    def _look(self) -> None:
        """Ask every running tunnel that moved no byte since the last look to park."""
        for tun in self.running:
            stats = tun.stats
            moved = stats.bytes_up + stats.bytes_down
            if moved != tun.seen or tun.writing or tun.wants_park:
                tun.seen = moved
                continue
            tun.wants_park = True
            if tun.ending.scope is not None:
                tun.ending.scope.cancel()

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[1].entry is entry]
        heapq.heapify(self._heap)
        self._stale = 0

    def _end(self, tun: Tunnel, why: str) -> None:
        self._unpark(tun)
        tun.finished(why)
        self._ended(tun)

    @staticmethod
    def _ended(tun: Tunnel) -> None:
        assert tun.session is not None
        tun.session.end_parked()


def _fileno(sock: socket.socket | None) -> int:
    return -1 if sock is None else sock.fileno()
