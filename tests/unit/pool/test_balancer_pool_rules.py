"""The balancer's pool rules (interface.md 9-11): down/full servers, pins, the hash ring's
bounded load, slow start, and counts shared across reloads."""

from __future__ import annotations

import collections

import pytest

from upgradeproxy.config.model import Address, Config, HealthCheck, Server, Upstream
from upgradeproxy.pool.balancer import Balancer, no_server_available
from upgradeproxy.pool.health import Health
from upgradeproxy.pool.servers import ServerBook, UpstreamState
from upgradeproxy.pool.sticky import server_token


def make(*weights: int) -> list[Server]:
    return [Server(Address(f"10.0.0.{i}", 80), weight=w) for i, w in enumerate(weights)]


def name(server: Server) -> str:
    return "abcdefghij"[int(server.address.host.rsplit(".", 1)[1])]


def first(balancer: Balancer, **kwargs: object) -> str:
    return name(next(balancer.candidates(**kwargs)))  # type: ignore[arg-type]


def down(state: UpstreamState, server: Server) -> None:
    state.servers[server.address].health = Health(up=False)
    state.version += 1


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "hash"])
def test_down_servers_never_appear(policy) -> None:
    servers = make(1, 1, 1)
    state = UpstreamState()
    balancer = Balancer(servers, policy, state)
    down(state, servers[1])
    for i in range(6):
        picked = list(balancer.candidates(key=b"k%d" % i))
        assert servers[1] not in picked
        assert len(picked) == 2


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "hash"])
def test_every_server_down_gives_no_candidate(policy) -> None:
    servers = make(1, 1)
    state = UpstreamState()
    balancer = Balancer(servers, policy, state)
    for server in servers:
        down(state, server)
    assert list(balancer.candidates(key=b"k")) == []


def test_full_server_is_skipped_for_tunnels_only() -> None:
    servers = make(1, 1)
    balancer = Balancer(servers, "least_conn", max_tunnels=1)
    balancer.acquire(servers[0])
    balancer.hold_tunnel(servers[0])
    assert servers[0] not in list(balancer.candidates(tunnel=True))
    assert servers[0] in list(balancer.candidates(tunnel=False))
    balancer.acquire(servers[1])
    balancer.hold_tunnel(servers[1])
    assert list(balancer.candidates(tunnel=True)) == []
    balancer.release_tunnel(servers[0])
    assert list(balancer.candidates(tunnel=True)) == [servers[0]]
    assert balancer.active(servers[0]) == 0


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "hash"])
def test_pin_goes_first_whatever_the_balance(policy) -> None:
    servers = make(1, 1, 1)
    balancer = Balancer(servers, policy, name="chat")
    pin = server_token("chat", servers[2].address)
    for i in range(5):
        assert first(balancer, pin=pin, key=b"k%d" % i) == "c"
    assert list(balancer.candidates(pin=pin)).count(servers[2]) == 1


def test_pin_to_a_down_or_full_server_is_ignored() -> None:
    servers = make(1, 1)
    state = UpstreamState()
    balancer = Balancer(servers, "round_robin", state, name="chat", max_tunnels=1)
    pin = server_token("chat", servers[1].address)
    balancer.acquire(servers[1])
    balancer.hold_tunnel(servers[1])
    assert first(balancer, pin=pin, tunnel=True) == "a"
    balancer.release_tunnel(servers[1])
    down(state, servers[1])
    assert first(balancer, pin=pin) == "a"
    assert first(balancer, pin="not-a-token") == "a"


def test_set_cookie_names_the_server_unless_the_pin_already_does() -> None:
    servers = make(1, 1)
    balancer = Balancer(servers, "round_robin", name="chat", sticky_cookie="upx")
    token = server_token("chat", servers[0].address)
    header = (b"Set-Cookie", f"upx={token}; Path=/; HttpOnly; SameSite=Lax".encode())
    assert balancer.set_cookie(servers[0], None, secure=False) == [header]
    assert balancer.set_cookie(servers[0], "stale", secure=False) == [header]
    assert balancer.set_cookie(servers[0], token, secure=False) == []
    assert Balancer(servers, "round_robin").set_cookie(servers[0], None, secure=True) == []


def test_hash_same_key_same_server_and_keyless_round_robin() -> None:
    balancer = Balancer(make(1, 1, 1, 1), "hash")
    for i in range(20):
        key = b"user-%d" % i
        assert len({first(balancer, key=key) for _ in range(5)}) == 1
    assert "".join(first(balancer) for _ in range(8)) == "abcdabcd"


def test_hash_bounded_load_20_tunnels_of_one_key_over_4() -> None:
    """No server above ceil(1.25 x 20 / 4) = 7 while another has room."""
    servers = make(1, 1, 1, 1)
    balancer = Balancer(servers, "hash")
    for _ in range(20):
        server = next(balancer.candidates(key=b"hot-room", tunnel=True))
        balancer.acquire(server)
        balancer.hold_tunnel(server)
    loads = [balancer.active(s) for s in servers]
    assert sum(loads) == 20
    assert max(loads) <= 7, loads


def test_hash_down_server_keys_go_to_the_next_on_the_ring() -> None:
    servers = make(1, 1, 1, 1)
    state = UpstreamState()
    balancer = Balancer(servers, "hash", state)
    keys = [b"k%d" % i for i in range(200)]
    before = {k: list(balancer.candidates(key=k)) for k in keys}
    down(state, servers[0])
    for key in keys:
        order = before[key]
        expected = order[1] if order[0] == servers[0] else order[0]
        assert next(balancer.candidates(key=key)) == expected


def test_slow_start_gives_a_returning_server_a_small_share() -> None:
    servers = make(1, 1)
    state = UpstreamState()
    balancer = Balancer(servers, "round_robin", state, slow_start=100.0)
    state.servers[servers[1].address].up_since = 0.0
    early = collections.Counter(first(balancer, now=1.0) for _ in range(110))
    assert early["b"] == 10, early  # 0.1 of a weight next to 1: one pick in eleven
    late = collections.Counter(first(balancer, now=500.0) for _ in range(100))
    assert late["b"] == 50, late


def test_slow_start_lowers_the_hash_load_bound() -> None:
    servers = make(1, 1)
    state = UpstreamState()
    balancer = Balancer(servers, "hash", state, slow_start=100.0)
    state.servers[servers[1].address].up_since = 0.0
    key = next(b"k%d" % i for i in range(100) if first(balancer, key=b"k%d" % i) == "b")
    counts = collections.Counter()
    for _ in range(10):
        server = next(balancer.candidates(now=1.0, key=key))
        balancer.acquire(server)
        counts[name(server)] += 1
    assert counts["b"] <= 2, counts  # ceil(1.25 x 10 x 0.1 / 1.1) while ramping


def test_counts_are_shared_by_balancers_of_successive_reloads() -> None:
    """The issue's case: 6 tunnels over A and B, 3 on A close, a reload, 3 more go A, A, A."""
    upstream = Upstream("chat", tuple(make(1, 1)), "least_conn")
    book = ServerBook()
    config = Config(listeners=(), upstreams={"chat": upstream}, routes=())
    book.sync(config, 0.0)
    old = Balancer.for_upstream(upstream, book.upstreams["chat"])
    held = []
    for _ in range(6):
        server = next(old.candidates(tunnel=True))
        old.acquire(server)
        old.hold_tunnel(server)
        held.append(server)
    for server in [s for s in held if name(s) == "a"]:
        old.release_tunnel(server)
    book.sync(config, 1.0)
    new = Balancer.for_upstream(upstream, book.upstreams["chat"])
    picks = []
    for _ in range(3):
        server = next(new.candidates(tunnel=True))
        new.acquire(server)
        new.hold_tunnel(server)
        picks.append(name(server))
    assert picks == ["a", "a", "a"]
    assert old.tunnels(make(1, 1)[1]) == 3  # the old runtime's tunnels still count


def test_reload_adds_a_server_with_a_slow_start() -> None:
    one = Upstream("chat", tuple(make(1)), slow_start=10.0)
    two = Upstream("chat", tuple(make(1, 1)), slow_start=10.0)
    book = ServerBook()
    book.sync(Config(listeners=(), upstreams={"chat": one}, routes=()), 5.0)
    assert book.state("chat", make(1)[0].address).up_since == float("-inf")  # at start: full
    book.sync(Config(listeners=(), upstreams={"chat": two}, routes=()), 7.0)
    assert book.state("chat", make(1, 1)[1].address).up_since == 7.0


@pytest.mark.parametrize(
    ("check", "retry_after"),
    [(None, 1), (HealthCheck(interval=0.2), 1), (HealthCheck(interval=5.0), 5),
     (HealthCheck(interval=2.5), 3)],
)  # fmt: skip
def test_no_server_available_retry_after(check, retry_after) -> None:
    err = no_server_available(Upstream("chat", tuple(make(1)), health_check=check))
    assert (err.status, err.retry_after) == (503, retry_after)


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "hash"])
def test_a_single_server_is_offered_while_usable_whatever_the_policy(policy) -> None:
    """The one-server fast path keeps the rules: down or full means no candidate (503)."""
    server = make(1)[0]
    state = UpstreamState()
    balancer = Balancer([server], policy, state, max_tunnels=1)
    assert list(balancer.candidates(1.0, key=b"k", tunnel=True)) == [server]
    balancer.mark_failed(server, 0.0)  # refusing: still the last resort
    assert list(balancer.candidates(1.0, key=b"k")) == [server]
    balancer.acquire(server)
    balancer.hold_tunnel(server)
    assert list(balancer.candidates(1.0, tunnel=True)) == []  # full for tunnels
    assert list(balancer.candidates(1.0)) == [server]  # plain requests still go
    state.servers[server.address].health = Health(up=False)
    assert list(balancer.candidates(1.0)) == []
