"""pool/hashring.py: the consistent-hash ring (deterministic, few keys move when a server comes or
goes, weights set the share) and the bounded-load limit."""

from __future__ import annotations

import collections

import pytest

from upgradeproxy.pool.hashring import Ring, key_hash, load_bound, under_bound

KEYS = [f"user-{i}".encode() for i in range(300)]


def members(n: int, weight: int = 1) -> list[tuple[str, int]]:
    return [(f"10.0.0.{i}:80", weight) for i in range(n)]


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
