"""The wait for a connection's next request during a drain (contract "Operations additions"):
an idle keep-alive connection stays open for `timeouts.keepalive_drain`, a request that
arrives in that time is read, and the wait's end never loses bytes already on the socket.
Idle connections close at a random time between one and two graces, so their clients
reconnect spread over a grace (docs/draining.md).

`read_request` over a real socketpair, on trio's autojump clock: times are virtual and exact,
and the random draw is fixed by the `draw` fixture.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import h11
import pytest
import trio

from upgradeproxy.config.loader import parse_config
from upgradeproxy.connection import context
from upgradeproxy.connection.context import Client, Runtime, Shared
from upgradeproxy.connection.request import read_request
from upgradeproxy.rules.plan import Origin
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import HttpStream

CONFIG = """\
listen: [{address: "127.0.0.1:0"}]
upstreams: {app: {servers: ["127.0.0.1:9"]}}
routes: [{upstream: app}]
timeouts: {idle: 60, request_header: 30}
"""
REQUEST = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
GRACE = 2.0


@dataclass
class Peers:
    client: Client
    shared: Shared
    peer: socket.socket  # the client's end, written to synchronously


@pytest.fixture(params=[0.0, 0.5, 0.999], ids=["earliest", "middle", "latest"])
def draw(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    """The random draw that spreads idle closes over the second grace."""
    value: float = request.param
    monkeypatch.setattr(context.random, "random", lambda: value)
    return value


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    ours, theirs = trio.socket.socketpair()
    shared = Shared()
    rt = Runtime.build(parse_config(CONFIG, "t.yaml"))
    http = HttpStream(h11.Connection(h11.SERVER), trio.SocketStream(ours))
    client = Client(http, Origin("127.0.0.1", b"http"), rt, shared, first=False)
    peer = socket.socket(fileno=theirs.detach())
    yield Peers(client, shared, peer)
    peer.close()
    ours.close()


async def read(peers: Peers) -> tuple[h11.Request | None, float]:
    """The next request (or None) and the virtual time the read ended."""
    request = await read_request(peers.client, ExchangeRecord(client="127.0.0.1"))
    return request, trio.current_time()


async def read_in_background(peers: Peers, nursery: trio.Nursery) -> list[object]:
    done: list[object] = []

    async def reader() -> None:
        done.extend(await read(peers))

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    return done


def spread(draw: float) -> float:
    """How long after it began (or met the drain) an idle wait ends: one to two graces."""
    return GRACE * (1 + draw)


async def test_an_idle_connection_is_released_after_the_grace(peers, draw, autojump_clock):
    """Idle when the drain begins (at t=5): the wait ends one to two graces later, not at the
    idle timeout (t=60), and not at once."""
    async with trio.open_nursery() as nursery:
        done = await read_in_background(peers, nursery)
        await trio.sleep(5)
        peers.shared.begin_drain(GRACE)
    assert done == [None, 5 + spread(draw)]


async def test_a_connection_that_goes_idle_during_the_drain_gets_the_whole_grace(
    peers, draw, autojump_clock
):
    """The drain began at t=0; a connection whose wait starts at t=10 (its last response left
    before the drain) still gets the grace for its next request."""
    peers.shared.begin_drain(GRACE)
    await trio.sleep(10)
    assert await read(peers) == (None, 10 + spread(draw))


async def test_a_connection_that_never_sent_a_request_is_idle_too(peers, draw, autojump_clock):
    """An accepted connection still waiting for its first request (`request_header` 30 s)
    is closed quietly after the grace: no 408."""
    peers.client.first = True
    async with trio.open_nursery() as nursery:
        done = await read_in_background(peers, nursery)
        peers.shared.begin_drain(GRACE)
    assert done == [None, spread(draw)]


async def test_a_request_sent_inside_the_grace_is_read(peers, draw, autojump_clock):
    async with trio.open_nursery() as nursery:
        done = await read_in_background(peers, nursery)
        peers.shared.begin_drain(GRACE)
        await trio.sleep(GRACE - 0.01)
        peers.peer.sendall(REQUEST)
    request, at = done
    assert isinstance(request, h11.Request)
    assert (request.target, at) == (b"/next", GRACE - 0.01)


async def test_a_zero_grace_ends_idle_waits_at_once(peers, draw, autojump_clock):
    """`keepalive_drain: 0`: nothing to spread, the wait ends as the drain begins."""
    async with trio.open_nursery() as nursery:
        done = await read_in_background(peers, nursery)
        await trio.sleep(5)
        peers.shared.begin_drain(0.0)
    assert done == [None, 5.0]


@pytest.mark.parametrize("grace", [pytest.param(GRACE, id="grace"), pytest.param(0.0, id="zero")])
async def test_bytes_already_on_the_socket_when_the_wait_is_cut_are_read(peers, grace):
    """The request's bytes reach the socket and the wait is cancelled before the reader runs
    again (a drain's hard cut does this, as a deadline can between two polls): they are still
    read, so the request is answered instead of being reset by the close."""
    async with trio.open_nursery() as nursery:
        done = await read_in_background(peers, nursery)
        peers.shared.begin_drain(grace)
        peers.peer.sendall(REQUEST)
        for scope in list(peers.shared.keepalive_waits):
            scope.cancel()
    request, _ = done
    assert isinstance(request, h11.Request)
    assert request.target == b"/next"


async def test_without_a_drain_the_idle_timeout_still_applies(peers, autojump_clock):
    assert await read(peers) == (None, 60.0)


async def test_behind_tls_bytes_on_the_socket_when_the_wait_is_cut_are_read(ca):
    """The same behind TLS, where the socket (not the TLS layer) tells that something came."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("proxy.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ours, theirs = trio.socket.socketpair()
    tls = trio.SSLStream(trio.SocketStream(ours), server_ctx, server_side=True)
    peer = client_ctx.wrap_socket(
        socket.socket(fileno=theirs.detach()),
        server_hostname="proxy.test",
        do_handshake_on_connect=False,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, peer.do_handshake)
        await tls.do_handshake()
    shared = Shared()
    rt = Runtime.build(parse_config(CONFIG, "t.yaml"))
    client = Client(
        HttpStream(h11.Connection(h11.SERVER), tls),
        Origin("127.0.0.1", b"https"),
        rt,
        shared,
        first=False,
    )
    peers = Peers(client, shared, peer)
    try:
        async with trio.open_nursery() as nursery:
            done = await read_in_background(peers, nursery)
            shared.begin_drain(GRACE)
            peer.sendall(REQUEST)
            for scope in list(shared.keepalive_waits):
                scope.cancel()
        request, _ = done
        assert isinstance(request, h11.Request)
        assert request.target == b"/next"
    finally:
        peer.close()
        ours.close()
