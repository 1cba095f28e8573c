"""Server selection: interface.md "Load balancing" and nginx's documented algorithms."""

from __future__ import annotations

import pytest

from upgradeproxy.config.model import Address, Balance, Server
from upgradeproxy.pool.balancer import Balancer

NAMES = "abcdefgh"
POLICIES: list[Balance] = ["round_robin", "least_conn"]


def make(*weights: int) -> list[Server]:
    """Servers named a, b, c, ... (by the last octet of their address) with these weights."""
    return [Server(Address(f"10.0.0.{i}", 80), weight=w) for i, w in enumerate(weights)]


def name(server: Server) -> str:
    return NAMES[int(server.address.host.rsplit(".", 1)[1])]


def names(servers: list[Server]) -> str:
    return "".join(name(s) for s in servers)


def picks(balancer: Balancer, count: int, now: float | None = None) -> str:
    """The first choice of `count` successive `order()` calls."""
    return "".join(name(balancer.order(now)[0]) for _ in range(count))


# --- round robin ------------------------------------------------------------------------------

ROUND_ROBIN = [
    pytest.param((1, 1, 1), "abcabcabc", id="equal-weights"),
    # nginx's ngx_http_upstream_round_robin.c comment: weights 5,1,1 give "a a b a c a a".
    pytest.param((5, 1, 1), "aabacaa" * 2, id="nginx-5-1-1"),
    pytest.param((2, 1), "aba" * 3, id="2-1"),
    pytest.param((1, 2), "bab" * 3, id="1-2"),
    pytest.param((1,), "aaaa", id="single-server"),
    pytest.param((3, 3), "abab", id="equal-heavy-weights"),
]


@pytest.mark.parametrize(("weights", "expected"), ROUND_ROBIN)
def test_round_robin_sequence(weights: tuple[int, ...], expected: str) -> None:
    """round_robin honours weights deterministically (smooth weighted, ties by list order)."""
    assert picks(Balancer(make(*weights), "round_robin"), len(expected)) == expected


def test_round_robin_rest_is_the_upcoming_rotation() -> None:
    """After the chosen server, the others follow in the order the rotation would reach them."""
    balancer = Balancer(make(1, 1, 1), "round_robin")
    assert [names(balancer.order()) for _ in range(4)] == ["abc", "bca", "cab", "abc"]


def test_round_robin_ignores_load() -> None:
    """Open tunnels do not change round robin's rotation."""
    servers = make(1, 1)
    balancer = Balancer(servers, "round_robin")
    balancer.acquire(servers[0])
    balancer.acquire(servers[0])
    assert picks(balancer, 4) == "abab"


# --- order() covers every server ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("weights", [(1,), (1, 1, 1), (5, 1, 1), (2, 1), (1, 3, 2, 7)])
def test_order_lists_every_server_once(weights: tuple[int, ...], policy: Balance) -> None:
    """Each order() holds every server exactly once, so a refusing one can be skipped."""
    servers = make(*weights)
    balancer = Balancer(servers, policy)
    for step in range(20):
        ordered = balancer.order()
        assert sorted(ordered, key=name) == servers
        if step % 3 == 0:
            balancer.acquire(ordered[0])


# --- least connections --------------------------------------------------------------------------

LEAST_CONN = [
    pytest.param((1, 1, 1), (2, 1, 0), "cba", id="least-loaded-first"),
    pytest.param((1, 1, 1), (0, 1, 2), "abc", id="least-loaded-first-in-list-order"),
    pytest.param((2, 1), (1, 0), "ba", id="idle-beats-half-loaded-heavy"),
    pytest.param((2, 1), (1, 1), "ab", id="weight-halves-the-load"),
    pytest.param((3, 2), (2, 1), "ba", id="cross-multiplied-1/2-beats-2/3"),
    pytest.param((3, 1), (5, 2), "ab", id="cross-multiplied-5/3-beats-2/1"),
    pytest.param((1, 1, 1), (5, 0, 0), "bca", id="tie-broken-by-list-order-first"),
]


@pytest.mark.parametrize(("weights", "loads", "expected"), LEAST_CONN)
def test_least_conn_order(weights: tuple[int, ...], loads: tuple[int, ...], expected: str) -> None:
    """least_conn puts the lowest active/weight first, then the others by load."""
    servers = make(*weights)
    balancer = Balancer(servers, "least_conn")
    for server, load in zip(servers, loads, strict=True):
        for _ in range(load):
            balancer.acquire(server)
    assert names(balancer.order()) == expected


@pytest.mark.parametrize(("weights", "expected"), ROUND_ROBIN)
def test_least_conn_without_load_spreads_like_round_robin(
    weights: tuple[int, ...], expected: str
) -> None:
    """With every server idle, all are tied and the tie goes round robin (as in nginx)."""
    assert picks(Balancer(make(*weights), "least_conn"), len(expected)) == expected


def test_least_conn_ties_rotate_among_the_tied_only() -> None:
    """A busy server stays out of the rotation among the idle ones."""
    servers = make(1, 1, 1)
    balancer = Balancer(servers, "least_conn")
    balancer.acquire(servers[1])
    assert picks(balancer, 6) == "acacac"


@pytest.mark.parametrize(
    ("weights", "requests", "expected"),
    [
        pytest.param((1, 1, 1), 6, (2, 2, 2), id="even"),
        pytest.param((2, 1), 6, (4, 2), id="weighted-2-1"),
        pytest.param((5, 1, 1), 7, (5, 1, 1), id="weighted-5-1-1"),
    ],
)
def test_least_conn_spreads_long_lived_tunnels_by_weight(
    weights: tuple[int, ...], requests: int, expected: tuple[int, ...]
) -> None:
    """Tunnels that stay open count as load, so they spread in proportion to weight."""
    servers = make(*weights)
    balancer = Balancer(servers, "least_conn")
    for _ in range(requests):
        balancer.acquire(balancer.order()[0])
    assert tuple(balancer.active(s) for s in servers) == expected


def test_least_conn_follows_releases() -> None:
    """A server whose tunnels closed is preferred again."""
    servers = make(1, 1)
    balancer = Balancer(servers, "least_conn")
    balancer.acquire(servers[0])
    assert name(balancer.order()[0]) == "b"
    balancer.acquire(servers[1])
    balancer.acquire(servers[1])
    balancer.release(servers[0])
    assert name(balancer.order()[0]) == "a"


# --- acquire / release --------------------------------------------------------------------------


def test_acquire_release_counts() -> None:
    """active() counts acquires minus releases, per server."""
    servers = make(1, 1)
    balancer = Balancer(servers, "least_conn")
    assert balancer.active(servers[0]) == 0
    balancer.acquire(servers[0])
    balancer.acquire(servers[0])
    balancer.acquire(servers[1])
    balancer.release(servers[0])
    assert (balancer.active(servers[0]), balancer.active(servers[1])) == (1, 1)


def test_release_never_goes_below_zero() -> None:
    """An extra release leaves the count at zero instead of skewing least_conn."""
    servers = make(1)
    balancer = Balancer(servers, "least_conn")
    balancer.release(servers[0])
    assert balancer.active(servers[0]) == 0
    balancer.acquire(servers[0])
    assert balancer.active(servers[0]) == 1


def test_unknown_server_is_an_error() -> None:
    """A server from another upstream (or an old config) is a caller bug, not a silent no-op."""
    balancer = Balancer(make(1), "round_robin")
    stranger = Server(Address("192.0.2.1", 80))
    with pytest.raises(KeyError):
        balancer.acquire(stranger)


# --- failed servers -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_failed_server_goes_last_until_its_time_is_up(policy: Balance) -> None:
    """A failed server is tried only as a last resort, and comes back after `for_seconds`."""
    servers = make(1, 1, 1)
    balancer = Balancer(servers, policy)
    balancer.mark_failed(servers[0], now=100.0, for_seconds=10.0)
    for now in (100.0, 105.0, 109.9):
        ordered = balancer.order(now)
        assert name(ordered[-1]) == "a"
        assert sorted(ordered, key=name) == servers
    assert "a" in picks(balancer, 3, now=110.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_failed_server_skipped_by_rotation(policy: Balance) -> None:
    """The healthy servers share the picks while one is down."""
    servers = make(1, 1, 1)
    balancer = Balancer(servers, policy)
    balancer.mark_failed(servers[1], now=0.0)
    assert picks(balancer, 4, now=1.0) == "acac"


def test_default_failure_window_is_ten_seconds() -> None:
    """mark_failed without for_seconds lasts 10s."""
    servers = make(1, 1)
    balancer = Balancer(servers, "round_robin")
    balancer.mark_failed(servers[0], now=50.0)
    assert name(balancer.order(59.9)[0]) == "b"
    assert names(balancer.order(60.0)) == "ab"


def test_failed_servers_ordered_by_recovery_time() -> None:
    """Among failed servers, the one that recovers soonest is tried first."""
    servers = make(1, 1, 1)
    balancer = Balancer(servers, "round_robin")
    balancer.mark_failed(servers[0], now=0.0, for_seconds=30.0)
    balancer.mark_failed(servers[1], now=0.0, for_seconds=20.0)
    assert names(balancer.order(5.0)) == "cba"


@pytest.mark.parametrize("policy", POLICIES)
def test_all_failed_still_rotates_over_all(policy: Balance) -> None:
    """When every server is down, all are still offered, and the first choice still rotates."""
    servers = make(1, 1)
    balancer = Balancer(servers, policy)
    for server in servers:
        balancer.mark_failed(server, now=0.0)
    assert picks(balancer, 4, now=1.0) == "abab"
    assert sorted(balancer.order(1.0), key=name) == servers


def test_failures_ignored_without_a_clock() -> None:
    """order() with no `now` cannot judge failure windows and treats every server alike."""
    servers = make(1, 1)
    balancer = Balancer(servers, "round_robin")
    balancer.mark_failed(servers[0], now=0.0)
    assert picks(balancer, 2) == "ab"


# --- construction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("servers", "policy", "message"),
    [
        pytest.param([], "round_robin", "at least one server", id="no-servers"),
        pytest.param(make(1, 0), "round_robin", "weights", id="zero-weight"),
        pytest.param(make(1, -1), "least_conn", "weights", id="negative-weight"),
        pytest.param(make(1) * 2, "round_robin", "same server twice", id="duplicate-server"),
        pytest.param(make(1), "random", "unknown balance policy", id="unknown-policy"),
    ],
)
def test_invalid_construction(servers: list[Server], policy: Balance, message: str) -> None:
    """A balancer that could not pick sensibly is refused when the config is loaded."""
    with pytest.raises(ValueError, match=message):
        Balancer(servers, policy)
