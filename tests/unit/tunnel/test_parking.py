"""The waiter's timers and the park/wake cycle, on trio's mock clock: a parked tunnel's
`tunnel_idle` counts from its last byte, its lifetime and a spread drain's plan still end it,
and cancelling the waiter ends every parked tunnel (contract rules 5 and 13)."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.telemetry.metrics import Telemetry
from upgradeproxy.tunnel import parking as parking_module
from upgradeproxy.tunnel.parking import PARK_AFTER, Parking, park_after_from_env
from upgradeproxy.tunnel.relay import pump_splice
from upgradeproxy.tunnel.session import Switched
from upgradeproxy.tunnel.state import Direction, Ending, Tunnel

PARK = 1.0  # seconds: a tunnel parks between 1 and 2 s after its last byte


@dataclass
class Owner:
    """Stands for the connection: counts how often it is let go."""

    let_go_calls: int = 0

    def let_go(self) -> None:
        self.let_go_calls += 1


@dataclass
class Rig:
    """A parkable tunnel between two app-side sockets, run by a real Switched and waiter."""

    parking: Parking
    switched: Switched
    client: trio.socket.SocketType  # the client application's end
    upstream: trio.socket.SocketType  # the upstream application's end
    owner: Owner = field(default_factory=Owner)
    ended_at: float = math.nan

    @property
    def first_close(self) -> str:
        return self.switched.rec.first_close

    async def until_parked(self, count: int = 1) -> None:
        while self.parking.parked != count:
            await trio.sleep(0.01)

    async def until_closed(self) -> None:
        """Wait for the proxy to close the client side; note when."""
        while await self.client.recv(65536):
            pass
        self.ended_at = trio.current_time()


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


def _pair() -> tuple[trio.SocketStream, trio.socket.SocketType]:
    proxy_side, app_side = socket.socketpair()
    proxy_side.setblocking(False)
    return trio.SocketStream(
        trio.socket.from_stdlib_socket(proxy_side)
    ), trio.socket.from_stdlib_socket(app_side)


@asynccontextmanager
async def tunnel(
    idle: float = 60.0, lifetime: float = 0.0, tunnels: dict[Ending, None] | None = None
) -> AsyncIterator[Rig]:
    parking = Parking(PARK)
    client_side, client_app = _pair()
    upstream_side, upstream_app = _pair()
    switched = Switched(
        client_side, upstream_side, b"", b"", ExchangeRecord(client="192.0.2.1", kind="tunnel"),
        idle, Telemetry(), lifetime=lifetime, tunnels=tunnels, parking=parking,
    )  # fmt: skip
    rig = Rig(parking, switched, client_app, upstream_app)
    async with trio.open_nursery() as nursery:
        await nursery.start(parking.run)

        async def run() -> None:
            if await switched.run():
                switched.owner = rig.owner

        nursery.start_soon(run)
        yield rig
        nursery.cancel_scope.cancel()
    client_app.close()
    upstream_app.close()


async def test_a_quiet_tunnel_parks_and_wakes_with_its_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No byte for a park delay: the tunnel parks; a message from either side is relayed by
    the waiter and the tunnel stays parked; a burst brings its pumps back, then it parks
    again."""
    async with tunnel() as rig:
        await rig.until_parked()
        parked_at = trio.current_time()
        assert PARK <= parked_at <= 2 * PARK + 0.02  # the polling step
        await rig.client.send(b"hello")
        assert await rig.upstream.recv(100) == b"hello"
        await rig.upstream.send(b"back")
        assert await rig.client.recv(100) == b"back"
        assert rig.parking.parked == 1
        assert rig.parking.running == set()
        burst = bytes(range(256)) * 1024  # more than one read: the pumps take over
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, rig.upstream, burst)
            while len(received) < len(burst):
                received += await rig.client.recv(1 << 20)
        assert received == burst
        await rig.until_parked()
        tun = rig.switched.tun
        assert tun is not None
        assert (tun.stats.bytes_up, tun.stats.bytes_down) == (5, 4 + len(burst))


async def test_tunnel_idle_counts_from_the_last_byte_not_from_parking(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rule 5: a byte at t=5 then silence: with tunnel_idle 10 the parked tunnel closes at 15
    (at most 1% late), not 10 s after it parked."""
    async with tunnel(idle=10.0) as rig:
        await trio.sleep(5)
        await rig.client.send(b"x")
        assert await rig.upstream.recv(1) == b"x"
        last_byte = trio.current_time()
        await rig.until_parked()
        await rig.until_closed()
        assert last_byte + 10 <= rig.ended_at <= last_byte + 10.1 + 0.01
        assert rig.first_close == "idle"
        assert rig.owner.let_go_calls == 1
        assert rig.parking.parked == 0


async def test_bytes_relayed_while_parked_move_the_idle_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rule 5: a message relayed by the waiter (the tunnel stays parked) is a byte like any
    other: with tunnel_idle 10, the tunnel closes 10 s after it, not after it parked."""
    async with tunnel(idle=10.0) as rig:
        await rig.until_parked()
        await trio.sleep(6)
        await rig.upstream.send(b"tick")
        assert await rig.client.recv(4) == b"tick"
        last_byte = trio.current_time()
        assert rig.parking.parked == 1  # relayed without leaving the waiter
        await rig.until_closed()
        assert last_byte + 10 <= rig.ended_at <= last_byte + 10.1 + 0.01
        assert rig.first_close == "idle"


async def test_stale_deadlines_do_not_pile_up(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each burst brings the pumps back and leaves the old heap entry behind; past a bound the
    waiter rebuilds its heap, so entries stay within a few of the tunnels parked."""
    monkeypatch.setattr(parking_module, "_COMPACT_AT", 4)
    burst = b"b" * 65536  # more than one read: the pumps take over
    async with tunnel(idle=3600.0) as rig:
        for _ in range(12):
            await rig.until_parked()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, rig.client, burst)
                got = 0
                while got < len(burst):
                    got += len(await rig.upstream.recv(1 << 20))
        await rig.until_parked()
        await trio.sleep(3 * PARK)  # the waiter's timer task runs (and compacts) meanwhile
        assert len(rig.parking._heap) <= 4 + 2 * rig.parking.parked


async def test_a_tunnel_with_a_pump_of_its_own_gets_it_back_for_its_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A tunnel whose pump is not the byte splice (a frame-aware one, say) is not relayed by
    the waiter: a message to it brings its pumps back, and they carry it."""
    carried: list[str] = []

    async def own_pump(tun: Tunnel, direction: Direction, src: int, dst: int) -> None:
        carried.append(direction)
        await pump_splice(tun, direction, src, dst)

    async with tunnel() as rig:
        await rig.until_parked()
        tun = rig.switched.tun
        assert tun is not None
        tun.pump = own_pump
        await rig.client.send(b"through its own pump")
        assert await rig.upstream.recv(100) == b"through its own pump"
        assert sorted(carried) == ["down", "up"]
        await rig.until_parked()


async def test_a_lifetime_ends_a_parked_tunnel(autojump_clock: trio.testing.MockClock) -> None:
    """Rule 13: tunnel_max_lifetime 30 closes the parked tunnel 30-33 s after it opened."""
    async with tunnel(lifetime=30.0) as rig:
        await rig.until_parked()
        await rig.until_closed()
        assert 30 <= rig.ended_at <= 33.01
        assert rig.first_close == "lifetime"


async def test_a_spread_drain_plan_reaches_a_parked_tunnel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rule 13, drain_tunnels: spread: an end planned while the tunnel is parked ends it then,
    with first_close drain (the waiter wakes earlier than it planned to)."""
    tunnels: dict[Ending, None] = {}
    async with tunnel(tunnels=tunnels) as rig:
        await rig.until_parked()
        (ending,) = tunnels
        plan = trio.current_time() + 7
        ending.at(plan, "drain")
        await rig.until_closed()
        assert plan <= rig.ended_at <= plan + 0.01
        assert rig.first_close == "drain"
        assert tunnels == {}


async def test_cancelling_the_waiter_ends_every_parked_tunnel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The end of a drain cancels the waiter: each parked tunnel closes, logs `cancelled` and
    lets its connection go."""
    async with tunnel() as rig:
        await rig.until_parked()
    assert rig.first_close == "cancelled"
    assert rig.owner.let_go_calls == 1
    assert rig.parking.parked == 0


async def test_a_stalled_writer_never_parks_and_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rule 5, back-pressure: while the upstream does not read, the tunnel holds bytes it
    could not write; it does not park with them, and every byte arrives in order later."""
    payload = bytes(range(256)) * 8192  # 2 MiB: more than both socket buffers hold
    async with tunnel() as rig:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, rig.client, payload)
            await trio.sleep(10 * PARK)  # the upstream reads nothing all this while
            assert rig.parking.parked == 0
            received = bytearray()
            while len(received) < len(payload):
                received += await rig.upstream.recv(1 << 20)
        assert received == payload
        await rig.until_parked()


async def test_bytes_a_wake_cannot_write_go_first_when_the_tunnel_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rule 5: the waiter reads a parked tunnel's message but the destination is full: the
    bytes are held, and written first, in order, once the destination reads again."""
    async with tunnel() as rig:
        await rig.until_parked()
        tun = rig.switched.tun
        assert tun is not None
        assert tun.upstream is not None
        brim = bytearray()
        while True:  # fill the proxy's socket towards the upstream to the brim
            try:
                brim += b"j" * tun.upstream.send(b"j" * 65536)
            except BlockingIOError:
                break
        await rig.client.send(b"after the brim")
        await trio.sleep(5 * PARK)
        assert rig.parking.parked == 0  # running, waiting to write: not parked again
        received = bytearray()
        while len(received) < len(brim) + 14:
            received += await rig.upstream.recv(1 << 20)
        assert received == brim + b"after the brim"
        assert tun.stats.bytes_up == 14
        await rig.until_parked()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("", PARK_AFTER, id="unset: the default"),
        pytest.param("0", 0.0, id="0: never park"),
        pytest.param("0.25", 0.25, id="seconds"),
        pytest.param("soon", PARK_AFTER, id="not a number: the default"),
        pytest.param("-1", PARK_AFTER, id="negative: the default"),
        pytest.param("inf", PARK_AFTER, id="infinite: the default"),
    ],
)
def test_park_delay_from_the_environment(raw: str, expected: float) -> None:
    assert park_after_from_env({"UPGRADEPROXY_PARK_AFTER": raw} if raw else {}) == expected
