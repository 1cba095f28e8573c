"""Per-server state that outlives a reload: load, open tunnels, health (interface.md rule 11).

One `ServerBook` lives in the process-wide `Shared`. Each reload builds new balancers, but
they read and count on the same `ServerState` objects, found by upstream name and address,
so tunnels opened before a SIGHUP still count after it and a kept server keeps its health.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from upgradeproxy.config.model import Address, Config, Server, Upstream
from upgradeproxy.pool.hashring import PointCache
from upgradeproxy.pool.health import Health


class Follower(Protocol):
    """A balancer of a discovered upstream (pool.membership), as the set's owner sees it."""

    def follow(self, servers: Sequence[Server]) -> None: ...


class Closable(Protocol):
    """A tunnel's planned end (tunnel.relay.Ending), as the pool sees it."""

    deadline: float

    def at(self, deadline: float, why: str) -> None: ...


@dataclass(slots=True, eq=False)
class CheckResult:
    """The last active check of a server, for /upstreams."""

    passed: bool
    why: str  # "ok", or what failed
    at: float  # wall-clock seconds


@dataclass(slots=True, eq=False)
class ServerState:
    """What the proxy knows about one server of one upstream."""

    address: Address
    load: int = 0  # in-flight requests plus open tunnels
    tunnels: int = 0  # open tunnels only (max_tunnels)
    health: Health = field(default_factory=Health)
    up_since: float = float("-inf")  # trio clock: when it was added or came back up
    last_check: CheckResult | None = None
    # A discovered server's open tunnels, for `on_removal: drain`; None for a configured one.
    endings: set[Closable] | None = None


@dataclass(slots=True, eq=False)
class Discovered:
    """A discovered upstream's current servers and its last lookup (rule 16).

    One per upstream name for the life of the process: every balancer built for the upstream
    (by the first config and by each reload) follows its set.
    """

    source: tuple[object, ...] | None = None  # the `Discover.source` the servers came from
    servers: tuple[Server, ...] = ()
    name: str = ""
    at: float | None = None  # wall-clock time of the last lookup
    result: str = ""  # ok | empty | error; "" before the first lookup
    detail: str = ""
    gone: dict[Address, float] = field(default_factory=dict)  # left the set -> when (trio clock)
    ring_points: PointCache = field(default_factory=dict)  # balance: hash, by server
    followers: weakref.WeakSet[Follower] = field(default_factory=weakref.WeakSet)


@dataclass(slots=True, eq=False)
class UpstreamState:
    servers: dict[Address, ServerState] = field(default_factory=dict)
    load: int = 0  # the sum of its servers' loads: rule 9's L
    version: int = 0  # bumped on every health change, so balancers can cache weight sums
    listed: frozenset[Address] = frozenset()  # the addresses the latest config lists
    discovered: Discovered | None = None  # with `discover`: the set DNS gave


@dataclass(slots=True)
class ServerBook:
    """Every upstream's server states, by upstream name then address."""

    upstreams: dict[str, UpstreamState] = field(default_factory=dict)
    started: bool = False

    def sync(self, config: Config, now: float) -> None:
        """Add what `config` lists; a server new to its upstream after the first config
        starts its slow_start ramp at `now`. Entries are never dropped: an old runtime's
        tunnels may still release into them, and a server listed again finds its counts."""
        for name, upstream in config.upstreams.items():
            state = self.upstreams.setdefault(name, UpstreamState())
            if upstream.discover is not None and state.discovered is None:
                state.discovered = Discovered()
            for server in upstream.servers:
                address = server.address
                entry = state.servers.get(address)
                if entry is None:
                    entry = state.servers[address] = ServerState(address)
                if self.started and address not in state.listed:
                    entry.up_since = now
            state.listed = frozenset(s.address for s in upstream.servers)
        self.started = True

    def state(self, upstream: str, address: Address) -> ServerState:
        return self.upstreams[upstream].servers[address]


def servers_of(upstream: Upstream, state: UpstreamState) -> tuple[Server, ...]:
    """The servers an upstream has now: configured, or the discovered set."""
    if upstream.discover is None or state.discovered is None:
        return upstream.servers
    return state.discovered.servers


def describe(config: Config, book: ServerBook) -> dict[str, object]:
    """The /upstreams document: every upstream of `config` by name, with its servers' state."""
    out: dict[str, object] = {}
    for name, upstream in config.upstreams.items():
        servers: list[dict[str, object]] = []
        state = book.upstreams[name]
        for server in servers_of(upstream, state):
            st = state.servers[server.address]
            check = st.last_check
            servers.append({
                "address": str(server.address),
                "weight": server.weight,
                "healthy": st.health.up,
                "tunnels": st.tunnels,
                "in_flight": st.load - st.tunnels,
                "last_check": None if check is None else {
                    "passed": check.passed, "result": check.why, "time": round(check.at, 3),
                },
            })  # fmt: skip
        entry: dict[str, object] = {
            "name": name,
            "balance": upstream.balance,
            "health_check": upstream.health_check is not None,
            "servers": servers,
        }
        if upstream.discover is not None and state.discovered is not None:
            entry.update(_discovery(upstream, state, state.discovered))
        out[name] = entry
    return out


def _discovery(upstream: Upstream, state: UpstreamState, found: Discovered) -> dict[str, object]:
    """A discovered upstream's last lookup, and the servers that left but hold tunnels."""
    assert upstream.discover is not None
    leaving = [
        {"address": str(address), "tunnels": state.servers[address].tunnels}
        for address in found.gone
        if address in state.servers and state.servers[address].tunnels
    ]
    return {
        "discovery": {
            "name": upstream.discover.name,
            "time": None if found.at is None else round(found.at, 3),
            "result": found.result or None,
            "detail": found.detail,
            "interval": upstream.discover.interval,
        },
        "leaving": leaving,
    }
