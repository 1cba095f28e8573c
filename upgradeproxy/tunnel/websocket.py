"""The frame-aware relay of a route with a `websocket` block (contract rule 18).

Each direction's bytes pass a `FrameGate` (rules/websocket_frames.py), which reads the frame
headers and counts payloads; every byte it lets through goes on unchanged. The pumps that
drive the gates, and the close-down, are in tunnel/frame_pumps.py.

On a violation the offending direction has stopped on a frame boundary; the other direction
is asked to stop on its next one. Then the offender gets a Close with the rule's code, the
other side a Close 1001 (masked, as a client's must be, when it goes to the server), and the
tunnel closes. A Close goes nowhere that is not on a frame boundary, half-closed, or already
sent one.

`FramedTunnel` is a plain object the tunnel holds, not its tasks: the frame state outlives
the pump tasks. On plain TCP with a waiter the tunnel parks like any other (tunnel/parking.py):
its record is a `WebSocketTunnel`, which carries the frame state through a parked spell, and
its pump is `pump_frames`. Elsewhere (TLS, HTTP/2) `run_tunnel` drives `FramedTunnel.pumps`.
Both runners go through the same frame pumps and the same close-down.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from upgradeproxy.config.model import WebSocketLimits
from upgradeproxy.rules.websocket_frames import (
    FrameGate,
    FramePolicy,
    RateBucket,
    Violation,
    reserved_bits,
)
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.telemetry.metrics import Telemetry
from upgradeproxy.tunnel.frame_pumps import Way, close_down, halt, pump_portable, pump_splice
from upgradeproxy.tunnel.relay import HAVE_SPLICE, Pump
from upgradeproxy.tunnel.state import Direction, Ending, OnBytes, Tunnel, TunnelStats

__all__ = ["FramedTunnel", "WebSocketTunnel", "framed_tunnel", "pump_frames"]

_Pump = Callable[[], Awaitable["Violation | None"]]
# Shared by every tunnel that has none: replaced, never changed (a parked tunnel keeps no
# empty dict of its own).
_NO_WAYS: dict[str, Way] = {}
_NO_BYTES: dict[str, bytes] = {}


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


class FramedTunnel:
    """The frame state of one WebSocket tunnel: a gate per direction, and what ended it."""

    __slots__ = (
        "_counters", "_first", "_reported", "_run_scope", "down", "route", "telemetry", "up",
        "violation", "ways",
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
        # The bucket refills by the clock, not per read: a parked spell refills it too.
        self.up = FrameGate(policy("client"), RateBucket(rate, clock) if rate else None)
        self.down = FrameGate(policy("server"))
        self.route = route
        self.telemetry = telemetry
        self.violation: Violation | None = None  # the one that ended the tunnel
        self.ways = _NO_WAYS  # the running pumps' (none while parked)
        self._run_scope: trio.CancelScope | None = None  # the parkable run `ways` belong to
        self._counters = telemetry.websocket_counters(route)  # (up, down)
        self._reported = [0, 0]  # messages already added to them
        self._first = _NO_BYTES

    def early(self, client_rest: bytes, upstream_rest: bytes) -> None:
        """Bytes that came behind the handshake heads: the pumps pass them first, gated."""
        self._first = {"up": client_rest, "down": upstream_rest}

    def pumps(
        self, tun: Tunnel, client: trio.abc.Stream, upstream: trio.abc.Stream, allow_splice: bool
    ) -> tuple[Pump, Pump]:
        """One frame-reading pump per direction (the relay's `_pumps` hook)."""
        up = Way("up", self.up, upstream)
        down = Way("down", self.down, client)
        self.ways = {"up": up, "down": down}
        pumps: tuple[_Pump, _Pump]
        if (
            allow_splice
            and HAVE_SPLICE
            and isinstance(client, trio.SocketStream)
            and isinstance(upstream, trio.SocketStream)
        ):
            tun.stats.path = "splice+frames"
            client_fd, upstream_fd = client.socket.fileno(), upstream.socket.fileno()
            pumps = (
                partial(pump_splice, self, tun, up, client_fd, upstream_fd),
                partial(pump_splice, self, tun, down, upstream_fd, client_fd),
            )
        else:
            tun.stats.path = "portable+frames"
            pumps = (
                partial(pump_portable, self, tun, up, client, upstream),
                partial(pump_portable, self, tun, down, upstream, client),
            )
        return partial(self._run, tun, up, pumps[0]), partial(self._run, tun, down, pumps[1])

    def run_ways(self, tun: Tunnel) -> dict[str, Way]:
        """The two ways of a parkable tunnel's current run, made by whichever of its pumps
        starts first (a run is one `tun.ending.scope`); a direction that ended in an earlier
        run is ended and halted from the start."""
        if self._run_scope is not tun.ending.scope:
            assert tun.client is not None
            assert tun.upstream is not None
            self._run_scope = tun.ending.scope
            self.ways = {
                "up": Way("up", self.up, tun.upstream, ended=not tun.up_open),
                "down": Way("down", self.down, tun.client, ended=not tun.down_open),
            }
        return self.ways

    def parked(self) -> None:
        """The pumps stopped for a parked spell: drop what only a run needs."""
        self.ways = _NO_WAYS
        self._run_scope = None
        if not self._first:
            self._first = _NO_BYTES

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

    async def _run(self, tun: Tunnel, way: Way, pump: _Pump) -> None:
        """Run `pump` for `way`; a halted pump waits here for the tunnel to end, so the relay
        neither half-closes its destination nor calls it the side that closed first."""
        try:
            with way.scope:
                if way.gate.stopped:  # the other way's close-down came before this run
                    return await halt(way)
                first = self._first.pop(way.direction, b"")
                if first:
                    tun.touch()
                    if await self._pass(tun, way, first):
                        return await halt(way)
                violation = await pump()
                if violation is None and not way.gate.stopped and self.violation is None:
                    way.ended = True
                    way.halted.set()
                    return None  # end of stream: the relay half-closes `dst`
        finally:
            self.count()
        return await halt(way)

    async def _pass(self, tun: Tunnel, way: Way, data: bytes) -> bool:
        """Gate `data`, send what may go on; True when this direction must stop here."""
        forward, violation = way.gate.feed(data)
        if forward:
            await way.send(tun, forward)
        if violation is not None:
            await close_down(self, tun, way, violation)
            return True
        return way.gate.stopped


class WebSocketTunnel(Tunnel):
    """A parkable tunnel's record (tunnel/state.py) that also carries its frame state, so the
    gates' counts, rate bucket and place in a frame outlive each run and parked spell."""

    __slots__ = ("frames",)

    def __init__(
        self,
        stats: TunnelStats,
        idle_timeout: float,
        buffer_size: int,
        on_bytes: OnBytes | None,
        ending: Ending,
        frames: FramedTunnel,
    ) -> None:
        super().__init__(stats, idle_timeout, buffer_size, on_bytes, ending)
        self.frames = frames


async def pump_frames(tun: Tunnel, direction: Direction, src_fd: int, dst_fd: int) -> None:
    """A parkable WebSocket tunnel's pump (`Tunnel.pump`): one direction through its gate,
    until EOF; after a violation either way it waits for the close-down to end the tunnel."""
    assert isinstance(tun, WebSocketTunnel)
    ft = tun.frames
    way = ft.run_ways(tun)[direction]
    try:
        await ft._run(tun, way, partial(pump_splice, ft, tun, way, src_fd, dst_fd))
    finally:
        if tun.wants_park:
            ft.parked()
