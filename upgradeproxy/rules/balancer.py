"""Server selection for one upstream: smooth weighted round robin and weighted least connections.

Pure and clock-free: the caller passes `now` wherever time matters. One `Balancer` lives per
`Upstream` of a loaded config; it is not thread-safe, which trio's single thread makes moot.

Invariant: `order()` returns every server exactly once, best first, so the caller can skip a
server that refuses the connection and try the next (interface.md, "Load balancing").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from upgradeproxy.config.model import Balance, Server

# How long a refusing server goes to the back of the line (nginx `fail_timeout` is also 10s).
DEFAULT_FAIL_SECONDS: Final = 10.0


@dataclass(slots=True)
class _Peer:
    """Mutable per-server state, kept apart from the frozen `Server` it describes."""

    server: Server
    index: int
    current: int = 0  # smooth round robin's running score (nginx `current_weight`)
    active: int = 0  # in-flight requests plus open tunnels
    failed_until: float = float("-inf")  # marked failed until this time


class Balancer:
    """Orders one upstream's servers for each new request, by `round_robin` or `least_conn`."""

    def __init__(self, servers: Sequence[Server], policy: Balance) -> None:
        """Raises ValueError on no servers, a weight below 1, a repeated server or policy."""
        if not servers:
            raise ValueError("an upstream needs at least one server")
        if policy not in ("round_robin", "least_conn"):
            raise ValueError(f"unknown balance policy {policy!r}")
        self.policy = policy
        self._peers = [_Peer(server, i) for i, server in enumerate(servers)]
        self._by_server = {peer.server: peer for peer in self._peers}
        if len(self._by_server) != len(self._peers):
            # acquire()/release() name a server by value, so equal entries would share a count.
            raise ValueError("an upstream lists the same server twice")
        if any(s.weight < 1 for s in servers):
            raise ValueError("server weights must be at least 1")

    def order(self, now: float | None = None) -> list[Server]:
        """The servers to try for one new request, best first; advances the rotation by one pick.

        Servers marked failed at `now` come last, soonest to recover first, as a last resort.
        With `now=None` failures are not considered.
        """
        healthy = [p for p in self._peers if not _is_failed(p, now)]
        failed = [p for p in self._peers if _is_failed(p, now)]
        if not healthy:
            # Like nginx when every server is down: rotate over all of them rather than give up.
            return [p.server for p in self._rank(failed)]
        failed.sort(key=lambda p: (p.failed_until, p.index))
        return [p.server for p in self._rank(healthy) + failed]

    def acquire(self, server: Server) -> None:
        """Count an in-flight request or an open tunnel started on `server`."""
        self._by_server[server].active += 1

    def release(self, server: Server) -> None:
        """Count the end of what `acquire` counted; never goes below zero."""
        peer = self._by_server[server]
        peer.active = max(0, peer.active - 1)

    def active(self, server: Server) -> int:
        """In-flight requests plus open tunnels on `server`."""
        return self._by_server[server].active

    def mark_failed(
        self, server: Server, now: float, for_seconds: float = DEFAULT_FAIL_SECONDS
    ) -> None:
        """Put `server` at the back of `order()` until `now + for_seconds`."""
        self._by_server[server].failed_until = now + for_seconds

    def _rank(self, peers: list[_Peer]) -> list[_Peer]:
        """Pick one of `peers` by the policy, then list the others in the policy's order."""
        if self.policy == "least_conn":
            least = min(peers, key=_LOAD_KEY)
            chosen = _smooth_pick([p for p in peers if _compare_load(p, least) == 0])
            key = _LEAST_CONN_KEY
        else:
            chosen = _smooth_pick(peers)
            key = _ROUND_ROBIN_KEY
        return [chosen, *sorted((p for p in peers if p is not chosen), key=key)]


def _is_failed(peer: _Peer, now: float | None) -> bool:
    """Whether `peer` is still inside its failure window at `now`."""
    return now is not None and now < peer.failed_until


def _smooth_pick(peers: list[_Peer]) -> _Peer:
    """nginx's smooth weighted round robin over `peers`; ties go to the earliest listed.

    Each pick adds every weight to its peer's score, takes the highest score and lowers it by
    the total weight, so weights 5,1,1 give a a b a c a a: heavy servers are spread out.
    """
    total = 0
    best = peers[0]
    for peer in peers:
        peer.current += peer.server.weight
        total += peer.server.weight
        if peer.current > best.current:
            best = peer
    best.current -= total
    return best


def _compare_load(a: _Peer, b: _Peer) -> int:
    """Compare active/weight exactly by cross-multiplying: negative when `a` is less loaded."""
    return a.active * b.server.weight - b.active * a.server.weight


def _compare_due(a: _Peer, b: _Peer) -> int:
    """Negative when smooth round robin would pick `a` before `b` (list order breaks ties)."""
    return (b.current + b.server.weight) - (a.current + a.server.weight) or a.index - b.index


def _compare_least_conn(a: _Peer, b: _Peer) -> int:
    """Lightest load first; among equal loads, the one round robin would pick next."""
    return _compare_load(a, b) or _compare_due(a, b)


_LOAD_KEY = functools.cmp_to_key(_compare_load)
_ROUND_ROBIN_KEY = functools.cmp_to_key(_compare_due)
_LEAST_CONN_KEY = functools.cmp_to_key(_compare_least_conn)
