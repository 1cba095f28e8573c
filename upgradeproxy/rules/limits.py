"""Rule 14: who a connection belongs to for `limits.max_connections_per_ip`, and the counts.

Pure (no trio): the exchange asks `client_address` on a connection's first request, then
`AddressCounts.acquire`; the connection releases its address when it closes, tunnel included.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from upgradeproxy.config.model import IPNetwork
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules.forwarding import is_trusted


def client_address(
    peer_ip: str, headers: Sequence[tuple[bytes, bytes]], trusted: Sequence[IPNetwork]
) -> str:
    """The address a connection counts against: the one the proxy puts last in X-Forwarded-For.

    That is the peer (the PROXY source on a `proxy_protocol` listener, else the TCP peer),
    unless the peer is in `trusted_proxies`: then X-Forwarded-For is read from the right,
    skipping addresses that are themselves trusted proxies, and the first other one is the
    client (nginx's `real_ip_recursive`). An entry that is not an IP address ends the walk at
    the last good hop; if every entry is trusted, the leftmost one is used.
    """
    address = peer_ip
    if not is_trusted(peer_ip, trusted):
        return address
    entries = [e for v in hdr.get_all(headers, b"x-forwarded-for") for e in v.split(b",")]
    for entry in reversed(entries):
        try:
            address = str(ipaddress.ip_address(entry.strip().decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            break
        if not is_trusted(address, trusted):
            break
    return address


class AddressCounts:
    """Open connections per client address; an address with none has no entry (bounded)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, address: str, limit: int) -> bool:
        """Count one more connection for `address`, unless it already holds `limit` (0: none)."""
        held = self.counts.get(address, 0)
        if limit and held >= limit:
            return False
        self.counts[address] = held + 1
        return True

    def release(self, address: str) -> None:
        held = self.counts.get(address, 0) - 1
        if held > 0:
            self.counts[address] = held
        else:
            self.counts.pop(address, None)
