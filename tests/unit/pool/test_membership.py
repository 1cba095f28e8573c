"""A discovered upstream's balancer (interface.md rule 16): its set changes in place, a server
that leaves gets no new work but releases what it holds, one that comes back is the same
server, and its sticky id depends on its address and port only."""

from __future__ import annotations

import math
from dataclasses import dataclass

from upgradeproxy.config.model import Address, Discover, Server, Upstream
from upgradeproxy.pool.balancer import Balancer, no_server_available
from upgradeproxy.pool.membership import DiscoveredBalancer, balancer_for
from upgradeproxy.pool.servers import Discovered, ServerBook, UpstreamState, describe
from upgradeproxy.pool.sticky import address_token, server_token

DISCOVER = Discover("chat.test", 9000)


def s(last: int, weight: int = 1) -> Server:
    return Server(Address(f"10.0.0.{last}", 9000), weight)


def upstream(**keys: object) -> Upstream:
    return Upstream("chat", (), **{"discover": DISCOVER, **keys})  # type: ignore[arg-type]


def state_with(*servers: Server) -> UpstreamState:
    return UpstreamState(discovered=Discovered(source=DISCOVER.source, servers=servers))


@dataclass(eq=False)
class FakeEnding:
    """A tunnel's planned end, as the pool sees it."""

    deadline: float = math.inf
    why: str = ""

    def at(self, deadline: float, why: str) -> None:
        self.deadline, self.why = deadline, why


def picks(balancer: Balancer, n: int, **kw: object) -> list[str]:
    return [next(balancer.candidates(**kw)).address.host for _ in range(n)]  # type: ignore[arg-type]


def test_a_discovered_upstream_gets_a_following_balancer_and_a_configured_one_does_not() -> None:
    assert isinstance(balancer_for(upstream(), state_with(s(1))), DiscoveredBalancer)
    configured = Upstream("chat", (s(1),))
    assert type(balancer_for(configured, UpstreamState())) is Balancer


def test_the_sticky_id_depends_on_address_and_port_only() -> None:
    one = DiscoveredBalancer(upstream(sticky_cookie="upx"), state_with(s(1), s(2), s(3)))
    other = DiscoveredBalancer(upstream(sticky_cookie="upx"), state_with(s(3), s(1), s(2)))
    for server in (s(1), s(2), s(3)):
        assert one.token(server) == other.token(server) == address_token(server.address)
    configured = Balancer.for_upstream(Upstream("chat", (s(1),), sticky_cookie="upx"))
    # A configured server's id is as it always was (upstream name and address): old cookies
    # keep working.
    assert configured.token(s(1)) == server_token("chat", s(1).address)
    assert configured.token(s(1)) != address_token(s(1).address)


def test_a_server_that_leaves_gets_no_new_work_and_a_cookie_for_it_is_not_honoured() -> None:
    balancer = DiscoveredBalancer(upstream(sticky_cookie="upx"), state_with(s(1), s(2)))
    gone = balancer.token(s(1))
    balancer.follow((s(2), s(3)))
    assert set(picks(balancer, 6)) == {"10.0.0.2", "10.0.0.3"}
    assert next(balancer.candidates(pin=gone)).address.host in {"10.0.0.2", "10.0.0.3"}


def test_work_started_on_a_server_that_left_is_released_normally() -> None:
    state = state_with(s(1), s(2))
    balancer = DiscoveredBalancer(upstream(), state)
    ending = FakeEnding()
    balancer.acquire(s(1))
    balancer.hold_tunnel(s(1), ending)
    assert state.servers[s(1).address].endings is None  # only the Discovery gives it a set
    state.servers[s(1).address].endings = {ending}
    balancer.follow((s(2),))
    balancer.acquire(s(1))  # a connect that was under way when it left
    balancer.release(s(1))
    balancer.release_tunnel(s(1), ending)
    entry = state.servers[s(1).address]
    assert (entry.load, entry.tunnels, entry.endings) == (0, 0, set())
    assert state.load == 0


def test_a_server_that_comes_back_is_the_same_server() -> None:
    state = state_with(s(1), s(2))
    balancer = DiscoveredBalancer(upstream(sticky_cookie="upx"), state)
    token = balancer.token(s(1))
    balancer.acquire(s(1))
    balancer.hold_tunnel(s(1))
    entry = state.servers[s(1).address]
    balancer.follow((s(2),))
    balancer.follow((s(2), s(1)))
    assert state.servers[s(1).address] is entry
    assert (entry.load, entry.tunnels) == (1, 1)
    assert balancer.token(s(1)) == token
    assert next(balancer.candidates(pin=token)) == s(1)


def test_least_conn_counts_across_the_change() -> None:
    balancer = DiscoveredBalancer(upstream(balance="least_conn"), state_with(s(1), s(2)))
    for _ in range(3):
        balancer.acquire(s(1))
    balancer.follow((s(1), s(2), s(3)))
    balancer.acquire(s(3))
    assert picks(balancer, 1) == ["10.0.0.2"]


def test_an_empty_set_gives_no_server_and_a_503_that_says_so() -> None:
    balancer = DiscoveredBalancer(upstream(balance="hash"), state_with())
    assert list(balancer.candidates(key=b"k")) == []
    assert balancer.known() == 0
    err = no_server_available(upstream(discover=Discover("chat.test", 9000, interval=7.5)), 0)
    assert (err.status, err.retry_after) == (503, 8)
    assert "no servers" in err.detail


def test_every_balancer_of_the_upstream_follows_the_set() -> None:
    state = state_with(s(1))
    old = DiscoveredBalancer(upstream(), state)
    new = DiscoveredBalancer(upstream(balance="least_conn"), state)
    assert state.discovered is not None
    assert set(state.discovered.followers) == {old, new}


def test_a_balancer_for_a_name_not_yet_looked_up_starts_empty() -> None:
    state = state_with(s(1))
    other = Upstream("chat", (), discover=Discover("other.test", 9000))
    assert DiscoveredBalancer(other, state).known() == 0


def test_the_hash_ring_keeps_each_servers_points_across_a_change() -> None:
    state = state_with(s(1), s(2), s(3))
    balancer = DiscoveredBalancer(upstream(balance="hash"), state)
    keys = [f"k{i}".encode() for i in range(300)]
    before = {k: next(balancer.candidates(key=k)) for k in keys}
    assert state.discovered is not None
    cached = state.discovered.ring_points[(str(s(2).address), 1)]
    balancer.follow((s(1), s(2), s(3), s(4)))
    after = {k: next(balancer.candidates(key=k)) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == s(4) for k in moved)  # keys move only to the server that joined
    assert 0 < len(moved) < len(keys) / 2
    assert state.discovered.ring_points[(str(s(2).address), 1)] is cached


def test_upstreams_page_lists_discovered_servers_and_the_last_lookup() -> None:
    from upgradeproxy.config.model import Config, Route

    config = Config((), {"chat": upstream()}, (Route("chat"),))
    book = ServerBook()
    book.sync(config, 0.0)
    found = book.upstreams["chat"].discovered
    assert found is not None
    found.source, found.servers = DISCOVER.source, (s(1),)
    found.at, found.result, found.detail = 1700000000.5, "ok", "1 server"
    DiscoveredBalancer(upstream(), book.upstreams["chat"]).acquire(s(1))
    page = describe(config, book)["chat"]
    assert isinstance(page, dict)
    assert [server["address"] for server in page["servers"]] == ["10.0.0.1:9000"]
    assert page["servers"][0]["in_flight"] == 1
    assert page["discovery"] == {
        "name": "chat.test", "time": 1700000000.5, "result": "ok", "detail": "1 server",
        "interval": 5.0,
    }  # fmt: skip
