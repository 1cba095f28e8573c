"""The hand-over from HTTP to a tunnel after an accepted 101.

`Switched` carries only what the tunnel needs, so an idle tunnel holds no h11 state and no
request headers: the HTTP frames that produced it have returned before it runs.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TypeAlias

import trio

from upgradeproxy.config.model import Server
from upgradeproxy.path.streams import STREAM_ERRORS, aclose_quietly
from upgradeproxy.path.tunnel import TunnelStats, run_tunnel
from upgradeproxy.report.telemetry import ExchangeRecord, Telemetry
from upgradeproxy.rules.balancer import Balancer


class Done(enum.Enum):
    """How an exchange that did not switch leaves the client connection (h11's sentinels)."""

    KEEP_ALIVE = "keep-alive"  # another request may follow
    CLOSE = "close"


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

    async def run(self) -> None:
        """Splice until both sides are done; the tunnel's log line is written when it closes."""
        telemetry = self.telemetry
        stats = TunnelStats(bytes_up=len(self.client_rest), bytes_down=len(self.upstream_rest))
        telemetry.tunnel_opened()
        self._count_tunnel(opened=True)
        try:
            # Bytes behind the 101 head go first to the client; early client bytes only now.
            if self.upstream_rest:
                await self.client.send_all(self.upstream_rest)
                telemetry.tunnel_moved("down", len(self.upstream_rest))
            if self.client_rest:
                await self.upstream.send_all(self.client_rest)
                telemetry.tunnel_moved("up", len(self.client_rest))
            self.client_rest = self.upstream_rest = b""
            await run_tunnel(
                self.client,
                self.upstream,
                idle_timeout=self.idle,
                on_bytes=telemetry.tunnel_moved,
                stats=stats,
            )
        except STREAM_ERRORS:
            stats.first_close = stats.first_close or "error"
        finally:
            await aclose_quietly(self.upstream)
            if self.release is not None:
                balancer, server = self.release
                balancer.release_tunnel(server)
                telemetry.upstream_tunnels(
                    self.rec.upstream, self.rec.server, balancer.tunnels(server)
                )
            rec = self.rec
            rec.bytes_in, rec.bytes_out = stats.bytes_up, stats.bytes_down
            rec.first_close = stats.first_close
            rec.duration = time.monotonic() - rec.started
            telemetry.tunnel_closed(rec)

    def _count_tunnel(self, *, opened: bool) -> None:
        """Count this tunnel on its server (max_tunnels, /upstreams and the per-server gauge);
        the balancer counted it as a request until now, and releases both counts at the end."""
        if self.release is None:
            return
        balancer, server = self.release
        if opened:
            balancer.hold_tunnel(server)
        else:
            balancer.release_tunnel(server)
        self.telemetry.upstream_tunnels(
            self.rec.upstream, self.rec.server, balancer.tunnels(server)
        )


# What one exchange ends in: the connection goes on, closes, or becomes a tunnel.
Outcome: TypeAlias = Done | Switched
