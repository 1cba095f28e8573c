"""The state an exchange runs in: per loaded config, per process, per client connection."""

from __future__ import annotations

import math
import os
import random
import ssl
from dataclasses import dataclass, field
from typing import Protocol

import trio

from upgradeproxy.config.model import Config
from upgradeproxy.pool.balancer import Balancer
from upgradeproxy.pool.membership import balancer_for
from upgradeproxy.pool.servers import ServerBook
from upgradeproxy.rules.limits import AddressCounts
from upgradeproxy.rules.plan import Origin
from upgradeproxy.rules.routing import Router
from upgradeproxy.telemetry.metrics import Telemetry
from upgradeproxy.transport.streams import HttpStream
from upgradeproxy.transport.tls import client_tls_context
from upgradeproxy.tunnel.parking import Parking
from upgradeproxy.tunnel.state import Ending
from upgradeproxy.upstream.connections import Pool


@dataclass(slots=True)
class Runtime:
    """Everything derived once from a loaded config; swapped whole on reload."""

    config: Config
    router: Router
    balancers: dict[str, Balancer]
    tls_contexts: dict[str, ssl.SSLContext | None]

    @classmethod
    def build(cls, config: Config, book: ServerBook | None = None, now: float = 0.0) -> Runtime:
        """`book` carries server counts and health across reloads (rule 11); `now` starts
        the slow_start ramp of servers a reload adds."""
        book = book if book is not None else ServerBook()
        book.sync(config, now)
        return cls(
            config=config,
            router=Router(config.routes),
            balancers={n: balancer_for(u, book.upstreams[n]) for n, u in config.upstreams.items()},
            tls_contexts={
                n: client_tls_context(u.tls, f"upstreams.{n}.tls") if u.tls else None
                for n, u in config.upstreams.items()
            },
        )


@dataclass(slots=True)
class Shared:
    """Process-wide state that outlives a reload.

    The drain, as a connection handler sees it (`begin_drain` starts it): `draining` is the
    flag a response tests (from then on it says `Connection: close`); `drain_began` an event a
    handler may wait on; a cancel scope in `idle_waits` is cancelled the moment the drain
    begins (an HTTP/2 connection's read, which then sends GOAWAY); and an HTTP/1.1 wait for a
    next request registers its scope in `keepalive_waits`, whose deadline the drain shortens
    to the keep-alive grace (see `idle_deadline`).
    """

    telemetry: Telemetry = field(default_factory=Telemetry)
    pool: Pool = field(default_factory=Pool)
    draining: bool = False
    drain_began: trio.Event = field(default_factory=trio.Event)
    drain_since: float = math.inf  # trio time the drain (or retirement) began
    keepalive_grace: float = 0.0  # timeouts.keepalive_drain in force when it began
    idle_waits: set[trio.CancelScope] = field(default_factory=set)  # woken when it begins
    keepalive_waits: set[trio.CancelScope] = field(default_factory=set)  # given the grace
    per_ip: AddressCounts = field(default_factory=AddressCounts)  # rule 14, this worker
    # Open tunnels, for a spread drain: a dict keeps one for about half what a set does.
    tunnels: dict[Ending, None] = field(default_factory=dict)
    parking: Parking | None = None  # the waiter for idle tunnels, while the server runs it
    book: ServerBook = field(default_factory=ServerBook)

    def begin_drain(self, keepalive_grace: float) -> None:
        """From now on responses say `Connection: close`, a connection waiting for its next
        request waits no longer than `_idle_end` allows, and `idle_waits` are woken."""
        if self.draining:
            return
        self.draining = True
        self.drain_since = trio.current_time()
        self.keepalive_grace = keepalive_grace
        for scope in self.keepalive_waits:
            scope.deadline = min(scope.deadline, self._idle_end(self.drain_since))
        for scope in list(self.idle_waits):
            scope.cancel()
        self.drain_began.set()

    def idle_deadline(self, deadline: float) -> float:
        """`deadline` for a wait for a next request that starts now, during a drain: a
        connection that goes idle (or is accepted) after the drain began gets the whole grace."""
        return min(deadline, self._idle_end(trio.current_time()))

    def _idle_end(self, start: float) -> float:
        """When an idle wait that began (or met the drain) at `start` ends: a random time
        between one and two graces later, so that idle clients reconnect spread over a grace
        rather than all at once (HAProxy's close-spread-time; docs/draining.md measures it)."""
        return start + self.keepalive_grace * (1.0 + random.random())


class ConnectionOwner(Protocol):
    """Who accepted the connection (the server): told when a connection it let go ends."""

    def connection_done(self, token: object) -> None:
        """Give back the connection's slot (max_connections) and its count."""


@dataclass(slots=True, eq=False)
class Held:
    """What a client connection holds until it closes, tunnel included (so an idle tunnel
    need not keep its `Client`, with the h11 state, alive).

    When its tunnel parks and the connection's task returns, this is what the tunnel keeps
    (as its `Owner`) and lets go of when it ends."""

    admitted: str | None = None  # the address counted against max_connections_per_ip
    # Keep-alive connections whose PROXY header named this client: reused by it alone.
    own_pool: Pool | None = None
    # Set when the tunnel parks: what `let_go` gives back to.
    shared: Shared | None = None
    owner: ConnectionOwner | None = None
    token: object = None

    def release(self, shared: Shared) -> None:
        """Give back the per-address count and close the connection's own pool."""
        if self.admitted is not None:
            shared.per_ip.release(self.admitted)
            self.admitted = None
        if self.own_pool is not None:
            self.own_pool.close_all()
            self.own_pool = None

    def let_go(self) -> None:
        """The parked tunnel ended: release the connection's counts and its server slot."""
        if self.shared is not None:
            self.release(self.shared)
        if self.owner is not None:
            self.owner.connection_done(self.token)


class Edge(Protocol):
    """What the shared request path reads of a client connection, HTTP/1.1 (`Client`) or
    HTTP/2 (`connection.http2`) alike: routing, admission, the upstream pool and preamble."""

    @property
    def origin(self) -> Origin: ...
    @property
    def rt(self) -> Runtime: ...
    @property
    def shared(self) -> Shared: ...
    @property
    def first(self) -> bool: ...
    @property
    def peer(self) -> Peer | None: ...
    @property
    def over_limit(self) -> str | None: ...
    @property
    def held(self) -> Held: ...
    @property
    def peer_ip(self) -> str: ...


@dataclass(slots=True, eq=False)
class Client:
    """One client connection's context."""

    http: HttpStream
    origin: Origin
    rt: Runtime
    shared: Shared
    first: bool = True
    peer: Peer | None = None
    over_limit: str | None = None  # counted at accept and over the limit: 429 on its request
    held: Held = field(default_factory=Held)

    @property
    def peer_ip(self) -> str:
        return self.origin.ip


@dataclass(frozen=True, slots=True)
class Peer:
    """An accepted client as the listener learned it."""

    ip: str  # from the socket, or from a PROXY header
    tls: bool
    leftover: bytes = b""  # read past a PROXY header, not yet parsed
    port: int = 0  # the client's source port, beside `ip`
    local: tuple[str, int] | None = None  # the proxy's address the client connected to
    client_cert: str | None = None  # the verified TLS client certificate's subject


def new_request_id() -> bytes:
    """A fresh X-Request-ID: 16 random bytes in hex (about 1 us, a fifth of uuid4's cost)."""
    return os.urandom(16).hex().encode()
