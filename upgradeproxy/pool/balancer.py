"""Server selection for one upstream: smooth weighted round robin, weighted least connections,
and a consistent-hash ring with bounded load; a sticky cookie's server first; down and full
servers left out.

Pure and clock-free: the caller passes `now` wherever time matters. One `Balancer` lives per
`Upstream` of a loaded config, over counts and health shared across reloads (`ServerState`);
it is not thread-safe, which trio's single thread makes moot.

Invariant: `order()` returns every server exactly once, best first, so the caller can skip a
server that refuses the connection and try the next (interface.md, "Load balancing").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from upgradeproxy.config.model import Address, Balance, Server, Upstream
from upgradeproxy.errors import NoServerAvailable
from upgradeproxy.pool.hashring import PointCache, Ring, under_bound
from upgradeproxy.pool.health import slow_start_weight
from upgradeproxy.pool.servers import Closable, ServerState, UpstreamState
from upgradeproxy.pool.sticky import server_token, set_cookie

Header = tuple[bytes, bytes]

# How long a refusing server goes to the back of the line (nginx `fail_timeout` is also 10s).
DEFAULT_FAIL_SECONDS: Final = 10.0


@dataclass(slots=True)
class _Peer:
    """A server as one balancer sees it; its counts and health live in the shared `state`."""

    server: Server
    index: int
    state: ServerState
    current: float = 0  # smooth round robin's running score (nginx `current_weight`)
    weight: float = 0  # the weight of the latest ranking (slow_start lowers it for a while)
    failed_until: float = float("-inf")  # refused a connection: tried last until this time

    @property
    def active(self) -> int:
        return self.state.load


class Balancer:
    """Orders one upstream's servers for each new request: sticky pin, policy, fallbacks."""

    def __init__(
        self,
        servers: Sequence[Server],
        policy: Balance,
        state: UpstreamState | None = None,
        *,
        name: str = "",
        max_tunnels: int = 0,
        slow_start: float = 0.0,
        sticky_cookie: str | None = None,
    ) -> None:
        """Raises ValueError on no servers, a weight below 1, a repeated server or policy.

        `state` holds the counts and health shared with other balancers of the same upstream
        (earlier and later reloads); without it the balancer keeps its own.
        """
        if not servers and not self.may_be_empty:
            raise ValueError("an upstream needs at least one server")
        if policy not in ("round_robin", "least_conn", "hash"):
            raise ValueError(f"unknown balance policy {policy!r}")
        self.policy = policy
        self.name = name
        self.max_tunnels = max_tunnels
        self.slow_start = slow_start
        self.sticky_cookie = sticky_cookie
        self._state = state if state is not None else UpstreamState()
        self._by_server: dict[Server, _Peer] = {}
        self._token_of: dict[Server, str] = {}
        self._set_servers(servers)

    # An upstream whose servers come from DNS may have none for a while (rule 16), and keeps
    # its servers' ring points between sets.
    may_be_empty = False
    _ring_points: PointCache | None = None

    def _set_servers(self, servers: Sequence[Server]) -> None:
        """Build the per-pick structures for `servers`; a server already known keeps its
        peer (its round-robin score and failure window). Never called on a pick."""
        if any(s.weight < 1 for s in servers):
            raise ValueError("server weights must be at least 1")
        if len({s.address for s in servers}) != len(servers):
            # Counts are kept per address, so equal entries would share a count.
            raise ValueError("an upstream lists the same server twice")
        entries = self._state.servers
        peers: list[_Peer] = []
        for i, s in enumerate(servers):
            entry = entries.setdefault(s.address, ServerState(s.address))
            peer = self._by_server.get(s)
            if peer is None or peer.state is not entry:
                peer = _Peer(s, i, entry, weight=s.weight)
            peer.index = i
            peers.append(peer)
        self._peers = peers
        self._by_server.update((p.server, p) for p in peers)
        ring = self.policy == "hash" and peers
        members = [(str(s.address), s.weight) for s in servers]
        self._ring = Ring(members, self._ring_points) if ring else None
        self._tokens = {self._token(p.server.address): p for p in peers}
        self._token_of.update((p.server, token) for token, p in self._tokens.items())
        self._weights: tuple[int, float, float] | None = None  # (version, W, ramping until)

    def _token(self, address: Address) -> str:
        return server_token(self.name, address)

    def known(self) -> int:
        """How many servers the balancer has now (usable or not)."""
        return len(self._peers)

    @classmethod
    def for_upstream(cls, upstream: Upstream, state: UpstreamState | None = None) -> Balancer:
        return cls(
            upstream.servers, upstream.balance, state, name=upstream.name,
            max_tunnels=upstream.max_tunnels, slow_start=upstream.slow_start,
            sticky_cookie=upstream.sticky_cookie,
        )  # fmt: skip

    def order(self, now: float | None = None) -> list[Server]:
        """Every usable server for one new plain request, best first (see `candidates`)."""
        return list(self.candidates(now))

    def candidates(
        self,
        now: float | None = None,
        *,
        key: bytes | None = None,
        tunnel: bool = False,
        pin: str | None = None,
    ) -> Iterator[Server]:
        """The servers to try for one new request, best first, computed as they are asked for.

        Down servers never appear, nor full ones when the request may become a `tunnel`:
        nothing at all means 503. `pin` (a sticky cookie's token) names a server to try
        first if it is usable; then `key` walks the hash ring (with bounded load), or the
        policy ranks the rest. Servers marked failed at `now` come last, as a last resort;
        with `now=None` failures and slow_start are not considered.
        """
        pinned = self._tokens.get(pin) if pin is not None else None
        if pinned is not None and (not self._usable(pinned, tunnel) or _is_failed(pinned, now)):
            pinned = None
        if pinned is not None:
            yield pinned.server
        elif len(self._peers) == 1:
            # One server: nothing to rank (a ring of one takes every key under its bound).
            if self._usable(self._peers[0], tunnel):
                yield self._peers[0].server
            return
        if self._ring is not None and key is not None:
            yield from self._ring_order(key, now, tunnel, pinned)
            return
        usable = [p for p in self._peers if p is not pinned and self._usable(p, tunnel)]
        if not usable:
            return
        for peer in usable:
            peer.weight = self._weight(peer, now)
        healthy = [p for p in usable if not _is_failed(p, now)]
        failed = [p for p in usable if _is_failed(p, now)]
        if not healthy:
            # Like nginx when every server is refusing: rotate over them rather than give up.
            yield from (p.server for p in self._rank(failed))
            return
        yield from (p.server for p in self._rank(healthy))
        yield from (p.server for p in sorted(failed, key=lambda p: (p.failed_until, p.index)))

    def _ring_order(
        self, key: bytes, now: float | None, tunnel: bool, skip: _Peer | None
    ) -> Iterator[Server]:
        """Ring order from the key's point: servers under their load bound first (rule 9)."""
        assert self._ring is not None
        total_weight = self._up_weight(now)
        over: list[_Peer] = []
        failed: list[_Peer] = []
        for index in self._ring.walk(key):
            peer = self._peers[index]
            if peer is skip or not self._usable(peer, tunnel):
                continue
            if _is_failed(peer, now):
                failed.append(peer)
            elif under_bound(peer.active, self._state.load, self._weight(peer, now), total_weight):
                yield peer.server
            else:
                over.append(peer)
        yield from (p.server for p in over + failed)

    def token(self, server: Server) -> str:
        """The sticky cookie value that names `server`."""
        return self._token_of[server]

    def set_cookie(self, server: Server, pin: str | None, *, secure: bool) -> list[Header]:
        """The Set-Cookie to send when `server` answers a request that was pinned to `pin`:
        none without sticky_cookie or when the client's cookie already names `server`."""
        if self.sticky_cookie is None or (token := self.token(server)) == pin:
            return []
        return [set_cookie(self.sticky_cookie, token, secure=secure)]

    def acquire(self, server: Server) -> None:
        """Count an in-flight request or an open tunnel started on `server`."""
        self._by_server[server].state.load += 1
        self._state.load += 1

    def release(self, server: Server) -> None:
        """Count the end of what `acquire` counted; never goes below zero."""
        state = self._by_server[server].state
        if state.load > 0:
            state.load -= 1
            self._state.load = max(0, self._state.load - 1)

    def hold_tunnel(self, server: Server, ending: Closable | None = None) -> None:
        """The acquired request on `server` became a tunnel: it counts toward max_tunnels.
        (`ending`, the tunnel's planned end, matters to a discovered upstream only.)"""
        self._by_server[server].state.tunnels += 1

    def release_tunnel(self, server: Server, ending: Closable | None = None) -> None:
        """A tunnel held on `server` closed: release both of its counts."""
        state = self._by_server[server].state
        state.tunnels = max(0, state.tunnels - 1)
        self.release(server)

    def active(self, server: Server) -> int:
        """In-flight requests plus open tunnels on `server`."""
        return self._by_server[server].active

    def tunnels(self, server: Server) -> int:
        return self._by_server[server].state.tunnels

    def mark_failed(
        self, server: Server, now: float, for_seconds: float = DEFAULT_FAIL_SECONDS
    ) -> None:
        """Put `server` at the back of `order()` until `now + for_seconds`."""
        self._by_server[server].failed_until = now + for_seconds

    def _usable(self, peer: _Peer, tunnel: bool) -> bool:
        """Up, and (for what may become a tunnel) below max_tunnels."""
        if not peer.state.health.up:
            return False
        return not (tunnel and self.max_tunnels and peer.state.tunnels >= self.max_tunnels)

    def _weight(self, peer: _Peer, now: float | None) -> float:
        if not self.slow_start or now is None:
            return peer.server.weight
        return slow_start_weight(peer.server.weight, peer.state.up_since, now, self.slow_start)

    def _up_weight(self, now: float | None) -> float:
        """W of rule 9: the weight of the servers that are up; cached between health changes
        unless a slow_start ramp is under way."""
        cached = self._weights
        version = self._state.version
        if cached is not None and cached[0] == version and (now is None or now >= cached[2]):
            return cached[1]
        up = [p for p in self._peers if p.state.health.up]
        total = sum(self._weight(p, now) for p in up)
        ramping = max((p.state.up_since for p in up), default=float("-inf")) + self.slow_start
        self._weights = (version, total, ramping if self.slow_start else float("-inf"))
        return total

    def _rank(self, peers: list[_Peer]) -> Iterator[_Peer]:
        """Pick one of `peers` by the policy (O(N), like nginx's), then, only if asked for
        (the pick refused), the others in the policy's order."""
        if self.policy == "least_conn":
            least = min(peers, key=_LOAD_KEY)
            chosen = _smooth_pick([p for p in peers if _compare_load(p, least) == 0])
            key = _LEAST_CONN_KEY
        else:  # round_robin, and hash for a request without its key
            chosen = _smooth_pick(peers)
            key = _ROUND_ROBIN_KEY
        yield chosen
        yield from sorted((p for p in peers if p is not chosen), key=key)


def no_server_available(upstream: Upstream, known: int = 1) -> NoServerAvailable:
    """The 503 for an upstream whose servers are all down or full, or that has none (`known`
    is 0: DNS gave none). Retry-After is when that may change: one health-check interval, or
    one discovery interval, else a second."""
    if not known and upstream.discover is not None:
        retry = max(1, math.ceil(upstream.discover.interval))
        why = f"upstream {upstream.name!r} has no servers (none found in DNS)"
        return NoServerAvailable(why, retry_after=retry)
    check = upstream.health_check
    retry = max(1, math.ceil(check.interval)) if check is not None else 1
    why = f"every server of upstream {upstream.name!r} is down or full"
    return NoServerAvailable(why, retry_after=retry)


def _is_failed(peer: _Peer, now: float | None) -> bool:
    """Whether `peer` is still inside its failure window at `now`."""
    return now is not None and now < peer.failed_until


def _smooth_pick(peers: list[_Peer]) -> _Peer:
    """nginx's smooth weighted round robin over `peers`; ties go to the earliest listed.

    Each pick adds every weight to its peer's score, takes the highest score and lowers it by
    the total weight, so weights 5,1,1 give a a b a c a a: heavy servers are spread out.
    """
    total: float = 0
    best = peers[0]
    for peer in peers:
        peer.current += peer.weight
        total += peer.weight
        if peer.current > best.current:
            best = peer
    best.current -= total
    return best


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _compare_load(a: _Peer, b: _Peer) -> int:
    """Compare active/weight by cross-multiplying (exact for whole weights): negative when
    `a` is less loaded."""
    return _sign(a.active * b.weight - b.active * a.weight)


def _compare_due(a: _Peer, b: _Peer) -> int:
    """Negative when smooth round robin would pick `a` before `b` (list order breaks ties)."""
    return _sign((b.current + b.weight) - (a.current + a.weight)) or a.index - b.index


def _compare_least_conn(a: _Peer, b: _Peer) -> int:
    """Lightest load first; among equal loads, the one round robin would pick next."""
    return _compare_load(a, b) or _compare_due(a, b)


_LOAD_KEY = functools.cmp_to_key(_compare_load)
_ROUND_ROBIN_KEY = functools.cmp_to_key(_compare_due)
_LEAST_CONN_KEY = functools.cmp_to_key(_compare_least_conn)
