"""The resolver loops (interface.md rule 16): one task per discovered upstream, per process.

Like the health-check probers, each loop runs in the proxy's service nursery: every `interval`
it looks the name up (upstream/dns.py), and the pure rules (pool/discovery.py) say what the
set is now. A change is applied at once and off the request path: joining servers get an
entry (and slow_start), every balancer of the upstream rebuilds its server list, and a server
that left gets no new work; its tunnels stay, or with `on_removal: drain` are closed at times
spread over `timeouts.drain`.

At start, and when a reload changes a name, the first lookup happens before the proxy (or
the new config) takes traffic. A new generation (SIGUSR2) or a new worker starts from the
set its predecessor knew (a seed), so a failed first lookup never leaves it with none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import trio

from upgradeproxy.config.model import Address, Config, Discover, Server, Upstream
from upgradeproxy.pool.discovery import (
    SEED_ENV,
    SEED_FILE_ENV,
    Lookup,
    diff,
    next_servers,
    read_seed,
    seed_text,
    spread_deadlines,
)
from upgradeproxy.pool.servers import Discovered, ServerBook, ServerState, UpstreamState
from upgradeproxy.telemetry.metrics import Telemetry
from upgradeproxy.upstream.connections import Pool
from upgradeproxy.upstream.dns import asker, look_up

log = logging.getLogger("upgradeproxy")

# A server that left and holds nothing is forgotten this long after (its health and counts
# with it); one that comes back sooner is the same server again.
FORGET_AFTER: Final = 600.0


@dataclass(frozen=True, slots=True)
class _Spec:
    """What a loop runs with: a change restarts it."""

    discover: Discover
    connect: float  # timeouts.connect: the bound of one lookup
    drain: float  # timeouts.drain: the window of on_removal: drain


class Discovery:
    """The resolver loops of one proxy and the sets they keep (in the `ServerBook`)."""

    def __init__(self, book: ServerBook, telemetry: Telemetry, pool: Pool) -> None:
        self.book = book
        self.telemetry = telemetry
        self.pool = pool
        self._running: dict[str, tuple[_Spec, trio.CancelScope]] = {}
        self._started = False  # the first lookups of a process ramp nothing up
        self._seed_file = os.environ.get(SEED_FILE_ENV) or None
        self._seed = _read_seed(self._seed_file)

    async def look_ahead(self, config: Config) -> dict[str, Lookup]:
        """First lookups, all at once, not yet applied: at start of every discovered upstream,
        on a reload of those whose name, port or resolvers are new (or that come back)."""
        wanted = {
            name: upstream.discover
            for name, upstream in config.upstreams.items()
            if upstream.discover is not None
            and (
                not self._started
                or name not in self._running
                or self._source(name) != upstream.discover.source
            )
        }
        found: dict[str, Lookup] = {}

        async def one(name: str, discover: Discover) -> None:
            timeout = config.timeouts.connect
            found[name] = await look_up(discover, asker(discover, timeout), timeout)

        async with trio.open_nursery() as nursery:
            for name, discover in wanted.items():
                nursery.start_soon(one, name, discover, name=f"first lookup {name}")
        return found

    def sync(self, nursery: trio.Nursery, config: Config, fresh: Mapping[str, Lookup]) -> None:
        """Commit a config: apply `fresh` lookups, then start, restart or stop loops."""
        for name, (spec, scope) in list(self._running.items()):
            if _spec(config, name) != spec:
                scope.cancel()
                del self._running[name]
        now = trio.current_time()
        for name, upstream in config.upstreams.items():
            discover = upstream.discover
            if discover is None:
                self.telemetry.upstream_servers(name, len(upstream.servers))
                continue
            self.telemetry.discovery_lookup(name)
            if not self._started:
                self._use_seed(name, upstream, now)
            if name in fresh:
                try:
                    self._apply(name, upstream, config.timeouts.drain, fresh[name], now)
                except Exception:
                    # A bug must cost one lookup, never the start or the reload.
                    log.exception("upstream %s: applying a lookup failed", name)
            self.telemetry.upstream_servers(name, len(self._found(name).servers))
            if name not in self._running:
                wanted = _Spec(discover, config.timeouts.connect, config.timeouts.drain)
                scope = trio.CancelScope()
                self._running[name] = (wanted, scope)
                nursery.start_soon(
                    self._loop, name, upstream, wanted, scope, name=f"discover {name}"
                )
        self._started = True

    def seed_env(self) -> dict[str, str]:
        """The environment that hands every known set to a new generation (SIGUSR2)."""
        sets = self._sets()
        return {SEED_ENV: seed_text(sets)} if sets else {}

    # --- the loop ---------------------------------------------------------------------------

    async def _loop(
        self, name: str, upstream: Upstream, spec: _Spec, scope: trio.CancelScope
    ) -> None:
        with scope:
            ask = asker(spec.discover, spec.connect)
            due = trio.current_time() + spec.discover.interval
            while True:
                # The interval alone paces lookups: a short TTL does not make them more frequent.
                await trio.sleep_until(due)
                due = trio.current_time() + spec.discover.interval
                lookup = await look_up(spec.discover, ask, spec.connect)
                try:
                    self._apply(name, upstream, spec.drain, lookup, trio.current_time())
                except Exception:
                    # A bug must cost one lookup, never the service nursery (and the proxy).
                    log.exception("upstream %s: applying a lookup failed", name)

    def _apply(
        self, name: str, upstream: Upstream, drain: float, lookup: Lookup, now: float
    ) -> None:
        """Record one lookup (log, metrics, /upstreams) and apply the set it gives."""
        discover = upstream.discover
        assert discover is not None
        found = self._found(name)
        same = found.source == discover.source
        found.name, found.at = discover.name, time.time()
        found.result, found.detail = lookup.result, lookup.detail
        self.telemetry.discovery_lookup(name, lookup.result)
        _log_lookup(name, discover, lookup, len(found.servers) if same else 0, self._started)
        found.source = discover.source
        self._install(name, upstream, next_servers(found.servers, lookup, same_source=same), now)
        self._sweep(name, upstream, drain, now)

    def _install(
        self, name: str, upstream: Upstream, servers: tuple[Server, ...], now: float
    ) -> None:
        """Make `servers` the upstream's set: entries, balancers, leavers, log, metrics."""
        state = self.book.upstreams[name]
        found = self._found(name)
        for server in servers:
            entry = state.servers.setdefault(server.address, ServerState(server.address))
            if entry.endings is None:
                entry.endings = set()
        change = diff(found.servers, servers)
        if not change:
            return
        before, after = _addresses(found.servers), _addresses(servers)
        joined = [s.address for s in change.added if s.address not in before]
        left = [s.address for s in change.removed if s.address not in after]
        for address in joined:
            entry = state.servers[address]
            found.gone.pop(address, None)  # back again: the same entry, counts and health
            if self._started:
                entry.up_since = now  # joins with slow_start, if set (rule 11)
            self.telemetry.upstream_healthy(name, str(address), entry.health.up)
        for address in left:
            found.gone[address] = now
            self.pool.forget(address)
        found.servers = servers
        state.version += 1
        for balancer in list(found.followers):
            balancer.follow(servers)
        self.telemetry.upstream_servers(name, len(servers))
        log.info(
            "upstream %s: servers changed: %d joined, %d left, %d now", name, len(joined),
            len(left), len(servers),
            extra={"upstream": name, "added": [str(a) for a in joined],
                   "removed": [str(a) for a in left],
                   "reweighted": [str(s.address) for s in change.added if s.address in before],
                   "servers": [str(s.address) for s in servers]},
        )  # fmt: skip
        self._save_seed()

    def _sweep(self, name: str, upstream: Upstream, drain: float, now: float) -> None:
        """Servers that left: drain their tunnels (on_removal: drain), drop the metrics of
        those with none, forget those that hold nothing and left long ago."""
        state = self.book.upstreams[name]
        found = self._found(name)
        assert upstream.discover is not None
        closing = upstream.discover.on_removal == "drain"
        for address, since in list(found.gone.items()):
            entry = state.servers.get(address)
            if entry is None:
                del found.gone[address]
                continue
            if closing and entry.endings:
                _close_spread(entry, since, drain, now)
            if not entry.tunnels:
                self.telemetry.server_gone(name, str(address))
            if not entry.load and now - since >= FORGET_AFTER:
                del state.servers[address]
                del found.gone[address]

    # --- seeds: the set a new generation or worker starts from ------------------------------

    def _use_seed(self, name: str, upstream: Upstream, now: float) -> None:
        """Start from the set the previous generation (or a sibling worker) knew, if it was
        found for the same name, port and resolvers; a fresh lookup follows at once."""
        seeded = self._seed.get(name)
        if seeded is None or upstream.discover is None:
            return
        source, servers = seeded
        if source != upstream.discover.source:
            return
        self._found(name).source = source
        self._install(name, upstream, servers, now)
        log.info("upstream %s: starting from the %d servers known before", name, len(servers))

    def _sets(self) -> dict[str, tuple[tuple[object, ...], tuple[Server, ...]]]:
        out: dict[str, tuple[tuple[object, ...], tuple[Server, ...]]] = {}
        for name, state in self.book.upstreams.items():
            found = state.discovered
            if found is not None and found.source is not None:
                out[name] = (found.source, found.servers)
        return out

    def _save_seed(self) -> None:
        """Workers of one group share a seed file: a worker that starts reads it."""
        if self._seed_file is None:
            return
        directory = os.path.dirname(self._seed_file) or "."
        try:
            with tempfile.NamedTemporaryFile(
                "w", dir=directory, prefix=".seed-", delete=False, encoding="utf-8"
            ) as out:
                out.write(seed_text(self._sets()))
            os.replace(out.name, self._seed_file)
        except OSError as exc:
            log.warning("cannot save the discovered servers for new workers: %s", exc)

    def _found(self, name: str) -> Discovered:
        state: UpstreamState = self.book.upstreams[name]
        if state.discovered is None:
            state.discovered = Discovered()
        return state.discovered

    def _source(self, name: str) -> tuple[object, ...] | None:
        state = self.book.upstreams.get(name)
        return None if state is None or state.discovered is None else state.discovered.source


def _spec(config: Config, name: str) -> _Spec | None:
    upstream = config.upstreams.get(name)
    if upstream is None or upstream.discover is None:
        return None
    return _Spec(upstream.discover, config.timeouts.connect, config.timeouts.drain)


def _addresses(servers: tuple[Server, ...]) -> set[Address]:
    return {s.address for s in servers}


def _close_spread(entry: ServerState, since: float, drain: float, now: float) -> None:
    """Close the tunnels of a server that left at times spread over the drain window from
    when it left; a tunnel opened on it since (a connect under way then) gets its share of
    what is left of the window."""
    unplanned = [e for e in entry.endings or () if e.deadline == float("inf")]
    if not unplanned:
        return
    start = max(now, since)
    window = max(since + drain - start, 0.0)
    for ending, deadline in zip(
        unplanned, spread_deadlines(len(unplanned), start, window), strict=True
    ):
        ending.at(deadline, "drain")


def _log_lookup(name: str, discover: Discover, lookup: Lookup, known: int, started: bool) -> None:
    extra = {"upstream": name, "discover": discover.name, "result": lookup.result,
             "detail": lookup.detail}  # fmt: skip
    for warning in lookup.warnings:
        log.warning("upstream %s: %s: %s", name, discover.name, warning, extra=extra)
    if lookup.result == "ok":
        log.info("upstream %s: %s: %s", name, discover.name, lookup.detail, extra=extra)
    elif lookup.result == "empty":
        log.warning("upstream %s: %s: %s: no servers", name, discover.name, lookup.detail,
                    extra=extra)  # fmt: skip
    elif not started:
        log.warning("upstream %s: first lookup of %s failed (%s): starting with %d servers",
                    name, discover.name, lookup.detail, known, extra=extra)  # fmt: skip
    else:
        log.warning("upstream %s: lookup of %s failed (%s): keeping %d servers",
                    name, discover.name, lookup.detail, known, extra=extra)  # fmt: skip


def _read_seed(path: str | None) -> dict[str, tuple[tuple[object, ...], tuple[Server, ...]]]:
    """The seed handed down in the environment (a new generation), or a group's seed file."""
    text = os.environ.pop(SEED_ENV, None)
    if text is None and path is not None:
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as file:
            text = file.read()
    return read_seed(text) if text else {}
