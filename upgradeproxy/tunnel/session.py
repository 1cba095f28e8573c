"""A tunnel's life after an accepted 101: its counts, planned end, log line and relay.

`Switched` carries only what the tunnel needs, so an idle tunnel holds no h11 state and no
request headers: the HTTP frames that produced it have returned before it runs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from upgradeproxy.config.model import Server
from upgradeproxy.pool.balancer import Balancer
from upgradeproxy.pool.discovery import spread_deadlines
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.telemetry.metrics import Telemetry
from upgradeproxy.transport.streams import STREAM_ERRORS, aclose_quietly, plain_socket
from upgradeproxy.tunnel.parkable import close_sockets, make_parkable, run_parkable
from upgradeproxy.tunnel.parking import Parking
from upgradeproxy.tunnel.relay import run_tunnel
from upgradeproxy.tunnel.state import Ending, Tunnel, TunnelStats
from upgradeproxy.tunnel.websocket import FramedTunnel, WebSocketTunnel, pump_frames

log = logging.getLogger("upgradeproxy")

# Rule 13: a lifetime ends 0-10% late, at random, so a wave of tunnels opened together (after
# a deploy, a network blip) does not come back as a wave of reconnects.
LIFETIME_JITTER: Final = 0.1
_BUFFER: Final = 65536  # run_tunnel's default buffer_size: what the splice path's pipe sizes from


class Owner(Protocol):
    """What a connection held (its slot, its per-address count) while its tunnel lives on
    parked after the connection's task returned."""

    def let_go(self) -> None:
        """The tunnel ended: give back what the connection held."""


@dataclass(slots=True, eq=False)
class Switched:
    """An accepted upgrade: two streams, the bytes h11 held back, and the access record.

    On a plain TCP tunnel with a waiter this is also the session a parked tunnel keeps: its
    streams are dropped (the tunnel keeps the two stdlib sockets), the rest stays (a
    WebSocket-aware route's frame state among it)."""

    client: trio.abc.Stream | None
    upstream: trio.abc.Stream | None
    client_rest: bytes
    upstream_rest: bytes
    rec: ExchangeRecord
    idle: float
    telemetry: Telemetry
    release: tuple[Balancer, Server] | None = None
    lifetime: float = 0.0  # timeouts.tunnel_max_lifetime; 0: none
    tunnels: dict[Ending, None] | None = None  # the process's open tunnels, for a spread drain
    parking: Parking | None = None  # the process's waiter, if tunnels may park
    owner: Owner | None = None  # set by the connection when its tunnel parks
    tun: Tunnel | None = None  # a parkable tunnel's state
    frames: FramedTunnel | None = None  # rule 18: the route's `websocket` block reads frames

    async def run(self) -> bool:
        """Splice until both sides are done; the tunnel's log line is written when it closes.

        True if the tunnel parked instead: the waiter owns it from here, and the caller must
        set `owner` (before its next checkpoint) and leave the sockets open."""
        telemetry = self.telemetry
        stats = TunnelStats(bytes_up=len(self.client_rest), bytes_down=len(self.upstream_rest))
        telemetry.tunnel_opened(self.rec)
        ending = Ending()
        if self.lifetime:
            # Measured from here, once the 101 is on its way to the client.
            late = 1 + random.random() * LIFETIME_JITTER
            ending.at(trio.current_time() + self.lifetime * late, "lifetime")
        if self.tunnels is not None:
            self.tunnels[ending] = None
        self._count_tunnel(ending, opened=True)
        parked = False
        try:
            assert self.client is not None
            assert self.upstream is not None
            if self.frames is not None:  # the pumps pass the early bytes, gated
                self.frames.early(self.client_rest, self.upstream_rest)
                stats.bytes_up = stats.bytes_down = 0
            # Bytes behind the 101 head go first to the client; early client bytes only now.
            elif self.upstream_rest:
                await self.client.send_all(self.upstream_rest)
                telemetry.tunnel_moved("down", len(self.upstream_rest))
            if self.client_rest and self.frames is None:
                await self.upstream.send_all(self.client_rest)
                telemetry.tunnel_moved("up", len(self.client_rest))
            self.client_rest = self.upstream_rest = b""
            parking = self.parking
            client, upstream = plain_socket(self.client), plain_socket(self.upstream)
            if parking is None or not parking.accepting or client is None or upstream is None:
                await run_tunnel(
                    self.client,
                    self.upstream,
                    idle_timeout=self.idle,
                    on_bytes=telemetry.count_tunnel_bytes,
                    stats=stats,
                    ending=ending,
                    frames=self.frames,
                )
            else:
                if self.frames is None:
                    tun = self.tun = Tunnel(
                        stats, self.idle, _BUFFER, telemetry.count_tunnel_bytes, ending
                    )
                    make_parkable(tun, client, upstream, parking, self)
                else:  # its frame state goes with its record, through parked spells
                    tun = self.tun = WebSocketTunnel(
                        stats, self.idle, _BUFFER, telemetry.count_tunnel_bytes, ending,
                        self.frames,
                    )  # fmt: skip
                    make_parkable(tun, client, upstream, parking, self, pump_frames)
                    stats.path = "splice+frames"
                self.client = self.upstream = None  # the trio wrappers go; the sockets stay
                parked = await run_parkable(tun)
        except STREAM_ERRORS:
            stats.first_close = stats.first_close or "error"
        finally:
            if parked:
                parked = self._hand_over()
            else:
                if self.upstream is not None:
                    await aclose_quietly(self.upstream)
                self._end(stats, ending)
        return parked

    async def resume(self) -> None:
        """Run the tunnel again after a parked spell (in the waiter's nursery)."""
        tun = self.tun
        assert tun is not None
        parked = False
        try:
            parked = await run_parkable(tun)
        except Exception:
            # A bug must cost this tunnel, never the waiter and every tunnel parked in it.
            log.exception("unexpected error in a resumed tunnel")
            tun.finished("error")
        finally:
            if not (parked and self._hand_over()):
                self.end_parked()

    def end_parked(self) -> None:
        """End a parkable tunnel that nothing runs: close it, log it, release its counts."""
        tun = self.tun
        assert tun is not None
        close_sockets(tun)
        self._end(tun.stats, tun.ending)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.let_go()

    def _hand_over(self) -> bool:
        """Park the tunnel with the waiter; False if the waiter stopped (the drain is over)."""
        assert self.tun is not None
        assert self.parking is not None
        if not self.parking.accepting:
            self.tun.finished("cancelled")
            return False
        self.parking.park(self.tun)
        return True

    def _end(self, stats: TunnelStats, ending: Ending) -> None:
        """The tunnel is closed: forget it, uncount it, write its line."""
        if self.tun is not None:
            self.tun.session = None  # no cycle left for the garbage collector to find
        if self.tunnels is not None:
            self.tunnels.pop(ending, None)
        self._count_tunnel(ending, opened=False)
        rec = self.rec
        rec.bytes_in, rec.bytes_out = stats.bytes_up, stats.bytes_down
        rec.first_close = stats.first_close
        if self.frames is not None:
            self.frames.report(rec)
        rec.duration = time.monotonic() - rec.started
        self.telemetry.tunnel_closed(rec)

    def _count_tunnel(self, ending: Ending, *, opened: bool) -> None:
        """Count this tunnel on its server (max_tunnels, /upstreams and the per-server gauge);
        the balancer counted it as a request until now, and releases both counts at the end.
        (A discovered server also keeps `ending`, to close it if the server leaves DNS.)"""
        if self.release is None:
            return
        balancer, server = self.release
        if opened:
            balancer.hold_tunnel(server, ending)
        else:
            balancer.release_tunnel(server, ending)
        self.telemetry.upstream_tunnels(
            self.rec.upstream, self.rec.server, balancer.tunnels(server)
        )


def spread_ends(tunnels: Iterable[Ending], now: float, window: float) -> None:
    """Rule 13, `drain_tunnels: spread`: end `tunnels` at even steps over `window`, one at
    the middle of each of n equal slices (never at its very end, where the drain's own
    deadline cancels what is left), so their clients reconnect elsewhere a few at a time."""
    planned = list(tunnels)
    for ending, deadline in zip(planned, spread_deadlines(len(planned), now, window), strict=True):
        ending.at(deadline, "drain")
