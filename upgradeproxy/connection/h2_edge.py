"""An HTTP/2 client connection and its streams, as the `Edge` the shared request path
(`connection.forward`) reads: routing, admission, the upstream pool and its preamble."""

from __future__ import annotations

from dataclasses import dataclass, field

from upgradeproxy.connection.context import Held, Peer, Runtime, Shared
from upgradeproxy.connection.h2_channel import Channel, StreamState
from upgradeproxy.rules.plan import Origin


@dataclass(slots=True, eq=False)
class H2Client:
    """An HTTP/2 client connection's context (the `Edge` the shared request path reads)."""

    origin: Origin
    rt: Runtime
    shared: Shared
    peer: Peer | None
    channel: Channel
    first: bool = True
    over_limit: str | None = None
    held: Held = field(default_factory=Held)
    refused: bool = False  # a 429 went out: the connection closes (rule 14)

    @property
    def peer_ip(self) -> str:
        return self.origin.ip


@dataclass(slots=True, eq=False)
class StreamEdge:
    """One stream of an `H2Client`, as the shared request path's `Edge`."""

    conn: H2Client
    st: StreamState

    @property
    def origin(self) -> Origin:
        return self.conn.origin

    @property
    def rt(self) -> Runtime:
        return self.conn.rt

    @property
    def shared(self) -> Shared:
        return self.conn.shared

    @property
    def first(self) -> bool:
        return self.conn.first

    @property
    def peer(self) -> Peer | None:
        return self.conn.peer

    @property
    def over_limit(self) -> str | None:
        return self.conn.over_limit

    @property
    def held(self) -> Held:
        return self.conn.held

    @property
    def peer_ip(self) -> str:
        return self.conn.origin.ip
