"""A tunnel's life after an accepted 101: its counts, planned end, log line and relay.

`Switched` carries only what the tunnel needs, so an idle tunnel holds no h11 state and no
request headers: the HTTP frames that produced it have returned before it runs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import trio

from upgradeproxy.config.model import Server
from upgradeproxy.pool.balancer import Balancer
from upgradeproxy.pool.discovery import spread_deadlines
from upgradeproxy.telemetry.metrics import ExchangeRecord, Telemetry
from upgradeproxy.transport.streams import STREAM_ERRORS, aclose_quietly
from upgradeproxy.tunnel.relay import Ending, TunnelStats, run_tunnel
from upgradeproxy.tunnel.websocket import FramedTunnel

# Rule 13: a lifetime ends 0-10% late, at random, so a wave of tunnels opened together (after
# a deploy, a network blip) does not come back as a wave of reconnects.
LIFETIME_JITTER: Final = 0.1


@dataclass(slots=True, eq=False)
class Switched:
    """An accepted upgrade: two streams, the bytes h11 held back, and the access record."""

    client: trio.abc.Stream
    upstream: trio.abc.Stream
    client_rest: bytes
    upstream_rest: bytes
    rec: ExchangeRecord
    idle: float
    telemetry: Telemetry
    release: tuple[Balancer, Server] | None = None
    lifetime: float = 0.0  # timeouts.tunnel_max_lifetime; 0: none
    tunnels: set[Ending] | None = None  # the process's open tunnels, for a spread drain
    frames: FramedTunnel | None = None  # rule 18: the route's `websocket` block reads frames

    async def run(self) -> None:
        """Splice until both sides are done; the tunnel's log line is written when it closes."""
        telemetry = self.telemetry
        stats = TunnelStats(bytes_up=len(self.client_rest), bytes_down=len(self.upstream_rest))
        telemetry.tunnel_opened(self.rec)
        ending = Ending()
        if self.lifetime:
            # Measured from here, once the 101 is on its way to the client.
            late = 1 + random.random() * LIFETIME_JITTER
            ending.at(trio.current_time() + self.lifetime * late, "lifetime")
        if self.tunnels is not None:
            self.tunnels.add(ending)
        self._count_tunnel(ending, opened=True)
        try:
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
            await run_tunnel(
                self.client,
                self.upstream,
                idle_timeout=self.idle,
                on_bytes=telemetry.tunnel_moved,
                stats=stats,
                ending=ending,
                frames=self.frames,
            )
        except STREAM_ERRORS:
            stats.first_close = stats.first_close or "error"
        finally:
            if self.tunnels is not None:
                self.tunnels.discard(ending)
            await aclose_quietly(self.upstream)
            self._count_tunnel(ending, opened=False)
            rec = self.rec
            rec.bytes_in, rec.bytes_out = stats.bytes_up, stats.bytes_down
            rec.first_close = stats.first_close
            if self.frames is not None:
                self.frames.report(rec)
            rec.duration = time.monotonic() - rec.started
            telemetry.tunnel_closed(rec)

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
