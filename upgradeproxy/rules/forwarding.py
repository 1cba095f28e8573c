"""X-Forwarded-*, Forwarded and Via: who the client was, as pure functions.

A client may lie in these headers, so they are kept only from peers listed in
`trusted_proxies`; from anyone else they are replaced by what this hop saw.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from upgradeproxy.config.model import IPNetwork
from upgradeproxy.rules.headers import Headers, get_all, strip_hop_by_hop

_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)


@dataclass(frozen=True, slots=True)
class Hop:
    """What this hop knows about the request it forwards."""

    client_ip: str
    proto: bytes  # b"http" or b"https"
    host: bytes | None
    trusted: bool
    http_version: bytes = b"1.1"


def is_trusted(ip: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether `ip` lies in one of `networks`; unparsable addresses are never trusted."""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def via_value(http_version: bytes) -> bytes:
    """This hop's Via element (RFC 9110 §7.6.3)."""
    return http_version + b" upgradeproxy"


def _forwarded_node(ip: str) -> bytes:
    # RFC 7239 §6: IPv6 nodes are bracketed and the whole value quoted.
    return f'"[{ip}]"'.encode() if ":" in ip else ip.encode()


def forwarding_headers(headers: Sequence[tuple[bytes, bytes]], hop: Hop) -> Headers:
    """`headers` with the forwarding fields replaced (untrusted peer) or extended (trusted)."""
    out = [(n, v) for n, v in headers if n.lower() not in _FORWARDING]
    ip = hop.client_ip.encode()
    xff = b", ".join(get_all(headers, b"x-forwarded-for")) if hop.trusted else b""
    out.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
    proto = get_all(headers, b"x-forwarded-proto") if hop.trusted else []
    out.append((b"X-Forwarded-Proto", proto[0] if proto else hop.proto))
    fhost = get_all(headers, b"x-forwarded-host") if hop.trusted else []
    if fhost:
        out.append((b"X-Forwarded-Host", fhost[0]))
    elif hop.host is not None:
        out.append((b"X-Forwarded-Host", hop.host))
    forwarded = get_all(headers, b"forwarded") if hop.trusted else []
    if forwarded:
        element = b"for=" + _forwarded_node(hop.client_ip) + b";proto=" + hop.proto
        out.append((b"Forwarded", b", ".join([*forwarded, element])))
    out.append((b"Via", via_value(hop.http_version)))
    return out


def upstream_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    hop: Hop,
    offer: Sequence[bytes],
    framing: Sequence[tuple[bytes, bytes]],
) -> Headers:
    """The request fields to send upstream, in the order the contract's rule 3 demands.

    Client hop-by-hop fields go first, so `Connection: X-Forwarded-For` cannot remove ours.
    """
    out = forwarding_headers(strip_hop_by_hop(headers), hop)
    if offer:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", b", ".join(offer)))
    out.extend(framing)
    return out
