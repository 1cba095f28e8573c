"""The pure pool decisions: hash ring, load bound, health machine, slow start, sticky inputs."""

from __future__ import annotations

import collections

import pytest

from upgradeproxy.config.model import Address, HashKey
from upgradeproxy.pool import sticky
from upgradeproxy.pool.hashring import Ring, key_hash, load_bound, under_bound
from upgradeproxy.pool.health import SLOW_START_FLOOR, Health, observe, slow_start_weight

KEYS = [f"user-{i}".encode() for i in range(300)]


def members(n: int, weight: int = 1) -> list[tuple[str, int]]:
    return [(f"10.0.0.{i}:80", weight) for i in range(n)]


# --- the ring -------------------------------------------------------------------------------


def test_ring_is_deterministic_across_builds() -> None:
    """Two rings from the same members (another worker, a restart) map every key alike."""
    a, b = Ring(members(5)), Ring(members(5))
    assert [a.owner(k) for k in KEYS] == [b.owner(k) for k in KEYS]


def test_key_hash_is_pinned_not_pythons_randomised_hash() -> None:
    """The same value in every process and release: replicas of a pool must agree."""
    assert key_hash(b"abc") == 0xD8BB14D833D59559


def test_walk_yields_every_member_once_owner_first() -> None:
    ring = Ring(members(4))
    for key in KEYS[:50]:
        order = list(ring.walk(key))
        assert sorted(order) == [0, 1, 2, 3]
        assert order[0] == ring.owner(key)


def test_adding_a_tenth_server_moves_few_keys_and_only_to_it() -> None:
    before, after = Ring(members(9)), Ring(members(10))
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert len(moved) <= 0.20 * len(KEYS), len(moved)
    assert moved, "a new server must take some keys"
    assert all(after.owner(k) == 9 for k in moved)


def test_removing_a_server_moves_only_its_keys() -> None:
    before, after = Ring(members(5)), Ring(members(4))
    for key in KEYS:
        if before.owner(key) != 4:
            assert after.owner(key) == before.owner(key)


def test_weights_set_the_share_of_keys() -> None:
    """A weight-3 server owns about three times the keys of a weight-1 server."""
    ring = Ring([("a:1", 3), ("b:1", 1)])
    counts = collections.Counter(ring.owner(f"k{i}".encode()) for i in range(4000))
    assert 0.65 < counts[0] / 4000 < 0.85, counts


def test_a_servers_points_do_not_depend_on_the_others_weights() -> None:
    """Removing the only odd-weight server must not move keys between the others (a ring
    scaled by the weights' gcd would rebuild them all)."""
    full = [("a:1", 2), ("b:1", 2), ("c:1", 1)]
    before, after = Ring(full), Ring(full[:2])
    for k in KEYS:
        owner = before.owner(k)
        if owner != 2:
            assert after.owner(k) == owner


def test_ring_needs_members() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Ring([])


LOAD_BOUND = [
    # (L, w, W, bound) -- ceil(1.25 x (L + 1) x w / W)
    pytest.param(0, 1, 4, 1, id="empty-upstream"),
    pytest.param(19, 1, 4, 7, id="20th-of-4"),
    pytest.param(3, 1, 4, 2, id="L3-of-4"),
    pytest.param(7, 1, 2, 5, id="L7-of-2"),
    pytest.param(9, 3, 4, 10, id="heavy-server"),
    pytest.param(9, 1, 4, 4, id="light-server"),
    pytest.param(0, 1, 1, 2, id="single-server"),
]


@pytest.mark.parametrize(("total", "weight", "total_weight", "bound"), LOAD_BOUND)
def test_load_bound(total: int, weight: int, total_weight: int, bound: int) -> None:
    assert load_bound(total, weight, total_weight) == bound
    assert under_bound(bound - 1, total, weight, total_weight)
    assert not under_bound(bound, total, weight, total_weight)


def test_under_bound_with_no_weight_up() -> None:
    assert not under_bound(0, 0, 1, 0)


# --- health ---------------------------------------------------------------------------------

UP, DOWN = Health(True, 0), Health(False, 0)
HEALTH = [
    # (state, results, healthy_after, unhealthy_after, expected)
    pytest.param(UP, "f", 2, 3, Health(True, 1), id="one-failure-stays-up"),
    pytest.param(UP, "fff", 2, 3, DOWN, id="three-failures-go-down"),
    pytest.param(UP, "ffpff", 2, 3, Health(True, 2), id="a-pass-breaks-the-streak"),
    pytest.param(UP, "f", 2, 1, DOWN, id="unhealthy-after-1"),
    pytest.param(DOWN, "p", 2, 3, Health(False, 1), id="one-pass-stays-down"),
    pytest.param(DOWN, "pp", 2, 3, UP, id="two-passes-come-up"),
    pytest.param(DOWN, "pfp", 2, 3, Health(False, 1), id="a-failure-breaks-the-pass-streak"),
    pytest.param(UP, "ppp", 2, 3, UP, id="passes-keep-up"),
    pytest.param(DOWN, "fff", 2, 3, DOWN, id="failures-keep-down"),
    pytest.param(UP, "fffpp", 2, 3, UP, id="down-and-back"),
]


@pytest.mark.parametrize(("state", "results", "up_after", "down_after", "expected"), HEALTH)
def test_health_state_machine(
    state: Health, results: str, up_after: int, down_after: int, expected: Health
) -> None:
    for result in results:
        state = observe(state, result == "p", up_after, down_after)
    assert state == expected


def test_servers_start_up() -> None:
    assert Health().up


SLOW_START = [
    # (weight, since, now, duration, expected)
    pytest.param(10, 0.0, 0.0, 30.0, 10 * SLOW_START_FLOOR, id="just-up-floor"),
    pytest.param(10, 0.0, 1.0, 30.0, 10 * SLOW_START_FLOOR, id="below-floor"),
    pytest.param(10, 0.0, 15.0, 30.0, 5.0, id="half-way"),
    pytest.param(10, 0.0, 27.0, 30.0, 9.0, id="nearly-there"),
    pytest.param(10, 0.0, 30.0, 30.0, 10, id="ramp-over"),
    pytest.param(10, 0.0, 99.0, 30.0, 10, id="long-after"),
    pytest.param(4, 100.0, 5.0, 30.0, 4 * SLOW_START_FLOOR, id="clock-before-since"),
    pytest.param(3, 0.0, 0.0, 0.0, 3, id="no-slow-start"),
    pytest.param(3, float("-inf"), 0.0, 30.0, 3, id="never-ramped"),
]


@pytest.mark.parametrize(("weight", "since", "now", "duration", "expected"), SLOW_START)
def test_slow_start_weight(
    weight: int, since: float, now: float, duration: float, expected: float
) -> None:
    assert slow_start_weight(weight, since, now, duration) == pytest.approx(expected)


# --- sticky inputs --------------------------------------------------------------------------

COOKIE = [
    pytest.param([(b"Cookie", b"a=1; upx=tok; b=2")], b"tok", id="middle"),
    pytest.param([(b"cookie", b"upx=tok")], b"tok", id="alone"),
    pytest.param([(b"Cookie", b"a=1"), (b"Cookie", b"upx=t2")], b"t2", id="second-header"),
    pytest.param([(b"Cookie", b"xupx=1; upxx=2")], None, id="similar-names"),
    pytest.param([(b"Cookie", b"upx")], None, id="no-equals"),
    pytest.param([(b"X-Cookie", b"upx=1")], None, id="other-header"),
    pytest.param([(b"Cookie", b"upx=")], b"", id="empty-value"),
]


@pytest.mark.parametrize(("headers", "expected"), COOKIE)
def test_cookie_value(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    assert sticky.cookie(headers, b"upx") == expected


WITHOUT = [
    pytest.param([(b"Cookie", b"a=1; upx=t; b=2")], [(b"Cookie", b"a=1; b=2")], id="middle"),
    pytest.param([(b"Cookie", b"upx=t")], [], id="only-cookie-drops-header"),
    pytest.param([(b"Cookie", b"a=1;b=2")], [(b"Cookie", b"a=1;b=2")], id="untouched-bytes"),
    pytest.param(
        [(b"Host", b"x"), (b"Cookie", b"upx=t; upx=u"), (b"Cookie", b"c=3")],
        [(b"Host", b"x"), (b"Cookie", b"c=3")],
        id="repeated-and-other-header",
    ),
]


@pytest.mark.parametrize(("headers", "expected"), WITHOUT)
def test_without_cookie(headers: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]):
    assert sticky.without_cookie(headers, b"upx") == expected


H = [(b"Host", b"x"), (b"X-User", b" alice "), (b"Cookie", b"sid=s1; t=2")]
KEY_CASES = [
    pytest.param(HashKey("client_ip"), H, b"/", b"10.1.2.3", id="client-ip"),
    pytest.param(HashKey("header", "x-user"), H, b"/", b"alice", id="header"),
    pytest.param(HashKey("header", "x-none"), H, b"/", None, id="header-missing"),
    pytest.param(HashKey("cookie", "sid"), H, b"/", b"s1", id="cookie"),
    pytest.param(HashKey("cookie", "nope"), H, b"/", None, id="cookie-missing"),
    pytest.param(HashKey("query", "room"), H, b"/ws?a=1&room=r%2F9", b"r/9", id="query"),
    pytest.param(HashKey("query", "room"), H, b"/ws?rooms=1", None, id="query-missing"),
    pytest.param(HashKey("query", "room"), H, b"/ws", None, id="no-query"),
    pytest.param(HashKey("query", "room"), H, b"http://h/ws?room=5", b"5", id="absolute-form"),
]


@pytest.mark.parametrize(("spec", "headers", "target", "expected"), KEY_CASES)
def test_balance_key(spec: HashKey, headers, target: bytes, expected: bytes | None) -> None:
    assert sticky.balance_key(spec, headers, target, "10.1.2.3") == expected


def test_server_token_is_stable_opaque_and_distinct() -> None:
    a = Address("10.0.0.1", 9000)
    token = sticky.server_token("chat", a)
    assert token == sticky.server_token("chat", Address("10.0.0.1", 9000))
    assert len(token) == 16
    assert "10.0.0.1" not in token
    assert "9000" not in token
    assert token != sticky.server_token("chat", Address("10.0.0.2", 9000))
    assert token != sticky.server_token("games", a)
    # Pinned: a cookie set before a restart (or by another replica) must still name it.
    assert token == "60f2910014159872"


@pytest.mark.parametrize(
    ("secure", "expected"),
    [
        (False, b"upx=abc; Path=/; HttpOnly; SameSite=Lax"),
        (True, b"upx=abc; Path=/; HttpOnly; SameSite=Lax; Secure"),
    ],
)
def test_set_cookie_header(secure: bool, expected: bytes) -> None:
    assert sticky.set_cookie("upx", "abc", secure=secure) == (b"Set-Cookie", expected)
