"""What a client connection holds at the edge: its per-address count (rule 14) and, for
upstreams with `proxy_protocol`, its own PROXY header and keep-alive pool (rule 15).

A connection is counted against `limits.max_connections_per_ip` until it closes, a tunnel it
became included: from its accept when its peer is the client (an idle connection holds a
slot too), from its first request head when the peer is a trusted proxy (the client address
is in `X-Forwarded-For`). Over the limit, that first request gets a 429.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from upgradeproxy.config.model import Upstream
from upgradeproxy.connection.context import Edge, Held, Runtime, Shared
from upgradeproxy.errors import ProxyError, TooManyConnections
from upgradeproxy.rules import plan as planning
from upgradeproxy.rules.forwarding import is_trusted
from upgradeproxy.rules.limits import client_address
from upgradeproxy.rules.proxy_header import proxy_header
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.upstream.connections import Pool


class Accepted(Protocol):
    """A connection as counted at accept: HTTP/1.1's `Client` or an HTTP/2 connection."""

    rt: Runtime
    shared: Shared
    held: Held
    over_limit: str | None

    @property
    def peer_ip(self) -> str: ...


def admit_at_accept(client: Accepted) -> None:
    """Count a connection whose peer is the client as soon as it is accepted."""
    config = client.rt.config
    limit = config.limits.max_connections_per_ip
    if not limit or is_trusted(client.peer_ip, config.trusted_proxies):
        return
    if client.shared.per_ip.acquire(client.peer_ip, limit):
        client.held.admitted = client.peer_ip
    else:
        client.over_limit = client.peer_ip


def admit(client: Edge, head: planning.Head, rec: ExchangeRecord) -> None:
    """Count the connection for its client address, or raise TooManyConnections (429)."""
    config = client.rt.config
    limit = config.limits.max_connections_per_ip
    if not limit or client.held.admitted is not None:
        return
    address = client.over_limit or client_address(
        client.peer_ip, head.headers, config.trusted_proxies
    )
    if client.over_limit is None and client.shared.per_ip.acquire(address, limit):
        client.held.admitted = address
        return
    # The refusal is counted by route when the request routes; "" when it does not.
    with contextlib.suppress(ProxyError):
        rec.route = planning.locate(head, client.rt.router).route_label
    raise TooManyConnections(
        f"client {address} already holds {limit} connections (limits.max_connections_per_ip)"
    )


def release(held: Held, shared: Shared) -> None:
    """Give back what the connection held: its per-address count and its own pool."""
    held.release(shared)


def upstream_pool(client: Edge, upstream: Upstream) -> Pool:
    """Where idle connections to `upstream` wait: a connection that sent a PROXY header
    speaks for one client, so only that client's later requests may reuse it."""
    if not upstream.proxy_protocol:
        return client.shared.pool
    held = client.held
    if held.own_pool is None:
        held.own_pool = Pool()
    return held.own_pool


def preamble(client: Edge, upstream: Upstream) -> bytes:
    """The PROXY header a new connection to `upstream` starts with (b"" for none): the client
    as the listener learned it (PROXY source or TCP peer, never X-Forwarded-For) and the
    proxy address it connected to."""
    if not upstream.proxy_protocol:
        return b""
    peer = client.peer
    source = (peer.ip, peer.port) if peer is not None else None
    return proxy_header(upstream.proxy_protocol, source, peer.local if peer else None)
