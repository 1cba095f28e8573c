"""Per-server state that outlives a reload: load, open tunnels, health (interface.md rule 11).

One `ServerBook` lives in the process-wide `Shared`. Each reload builds new balancers, but
they read and count on the same `ServerState` objects, found by upstream name and address,
so tunnels opened before a SIGHUP still count after it and a kept server keeps its health.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upgradeproxy.config.model import Address, Config
from upgradeproxy.pool.health import Health


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


@dataclass(slots=True, eq=False)
class UpstreamState:
    servers: dict[Address, ServerState] = field(default_factory=dict)
    load: int = 0  # the sum of its servers' loads: rule 9's L
    version: int = 0  # bumped on every health change, so balancers can cache weight sums
    listed: frozenset[Address] = frozenset()  # the addresses the latest config lists


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


def describe(config: Config, book: ServerBook) -> dict[str, object]:
    """The /upstreams document: every upstream of `config` by name, with its servers' state."""
    out: dict[str, object] = {}
    for name, upstream in config.upstreams.items():
        servers: list[dict[str, object]] = []
        for server in upstream.servers:
            st = book.state(name, server.address)
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
        out[name] = {
            "name": name,
            "balance": upstream.balance,
            "health_check": upstream.health_check is not None,
            "servers": servers,
        }
    return out
