"""A weighted consistent-hash ring and the bounded-load test (interface.md rule 9).

Virtual nodes (ketama, as nginx `hash ... consistent` and HAProxy `balance hash` build them):
each server owns `POINTS_PER_WEIGHT x weight` points on a 64-bit circle; a key belongs to the
first point at or after its own hash, so a pick is one binary search, O(log N) in the number
of servers. Adding or removing one server of N moves only the keys of its own points, about
1/N of them, and only to or from that server. Rendezvous hashing would need no ring but
scores every server on every pick (O(N)), which is why it is not used here.

Hashes are BLAKE2b, not Python's `hash()`: the ring must be the same in every worker, on every
restart and on every replica of a pool, so the same key reaches the same server everywhere.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Final

# nginx's ketama uses 160 points per weight unit: enough that 10 servers get shares within a
# few percent of their weight, few enough that building a ring for a reload is instant.
POINTS_PER_WEIGHT: Final = 160
# Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads" (HAProxy's
# `hash-balance-factor 125`): no server above 1.25 x its share of the load plus one.
BALANCE_FACTOR: Final = (5, 4)

PointCache = dict[tuple[str, int], list[int]]  # (name, weight) -> that member's points


def key_hash(key: bytes) -> int:
    """A 64-bit position on the ring, the same in every process."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class Ring:
    """Points for servers identified by index; `walk` yields them in ring order from a key."""

    __slots__ = ("_owners", "_points", "size")

    def __init__(self, members: Sequence[tuple[str, int]], cache: PointCache | None = None) -> None:
        """`members` are (stable name, weight >= 1).

        A server's points depend on its own name and weight only (no scaling by the set's
        gcd): removing one server must leave every other server's points where they were.
        So a ring rebuilt for a changed set may take them from `cache` (hashing is most of the
        cost: about 1 ms per server) and hashes only the servers new to it.
        """
        if not members:
            raise ValueError("a ring needs at least one member")
        points: list[tuple[int, int]] = []
        for index, (name, weight) in enumerate(members):
            hashes = None if cache is None else cache.get((name, weight))
            if hashes is None:
                hashes = [
                    key_hash(f"{name}#{i}".encode()) for i in range(POINTS_PER_WEIGHT * weight)
                ]
                if cache is not None:
                    cache[name, weight] = hashes
            points.extend((point, index) for point in hashes)
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [owner for _, owner in points]
        self.size = len(members)

    def walk(self, key: bytes) -> Iterator[int]:
        """Every member index once, starting with the key's owner and going clockwise."""
        start = bisect.bisect_left(self._points, key_hash(key))
        seen: set[int] = set()
        count = len(self._owners)
        for offset in range(count):
            owner = self._owners[(start + offset) % count]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self.size:
                    return

    def owner(self, key: bytes) -> int:
        """The member the key belongs to when every member may take it."""
        return next(self.walk(key))


def load_bound(total_load: int, weight: float, total_weight: float) -> int:
    """The load below which a server may take one more: ceil(1.25 x (L + 1) x w / W)."""
    num, den = BALANCE_FACTOR
    top, bottom = num * (total_load + 1) * weight, den * total_weight
    if isinstance(top, int) and isinstance(bottom, int):
        return -(-top // bottom)  # exact for whole weights: no float rounding at the boundary
    return math.ceil(top / bottom)


def under_bound(load: int, total_load: int, weight: float, total_weight: float) -> bool:
    """Whether a server carrying `load` may take a new request or tunnel (rule 9)."""
    return total_weight > 0 and load < load_bound(total_load, weight, total_weight)
