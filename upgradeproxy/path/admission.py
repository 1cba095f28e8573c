"""Per-connection admission at the edge (rule 14) and what a connection gives back at its end.

A connection is counted against `limits.max_connections_per_ip` from its first request head
until it closes, a tunnel it became included; over the limit, that first request gets a 429.
"""

from __future__ import annotations

import contextlib

from upgradeproxy.path.context import Client
from upgradeproxy.report.telemetry import ExchangeRecord
from upgradeproxy.rules import plan as planning
from upgradeproxy.rules.errors import ProxyError, TooManyConnections
from upgradeproxy.rules.limits import client_address


def admit(client: Client, head: planning.Head, rec: ExchangeRecord) -> None:
    """Count the connection for its client address, or raise TooManyConnections (429)."""
    config = client.rt.config
    limit = config.limits.max_connections_per_ip
    if not limit:
        return
    address = client_address(client.peer_ip, head.headers, config.trusted_proxies)
    if client.shared.per_ip.acquire(address, limit):
        client.admitted = address
        return
    # The refusal is counted by route when the request routes; "" when it does not.
    with contextlib.suppress(ProxyError):
        rec.route = planning.locate(head, client.rt.router).route_label
    raise TooManyConnections(
        f"client {address} already holds {limit} connections (limits.max_connections_per_ip)"
    )


def release(client: Client) -> None:
    """Give back what the connection held: its per-address count."""
    if client.admitted is not None:
        client.shared.per_ip.release(client.admitted)
        client.admitted = None
