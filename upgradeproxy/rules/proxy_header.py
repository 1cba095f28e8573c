"""Builder for the PROXY protocol header the proxy sends to servers (rule 15), v1 and v2.

The counterpart of `proxy_protocol.py`'s parser, from its constants, so a header we build
is one we would accept. Pure: addresses in, bytes out.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

from upgradeproxy.rules.proxy_protocol import (
    _AF_INET,
    _AF_INET6,
    _AF_UNSPEC,
    _STREAM,
    _V1_PREFIX,
    _V2_LOCAL,
    _V2_PROXY,
    _V2_SIGNATURE,
    _V2_VERSION,
)

Endpoint = tuple[str, int]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def proxy_header(
    version: Literal[1, 2] | int, source: Endpoint | None, destination: Endpoint | None
) -> bytes:
    """The header announcing a TCP connection from `source` to `destination`.

    Either address None (nothing to announce, e.g. a health check of the proxy's own) gives
    v1 `PROXY UNKNOWN` / v2 LOCAL, which a server treats as a connection from its peer.
    When one address is IPv4 and the other IPv6, the IPv4 one is sent IPv4-mapped, as
    HAProxy does, since a header has one family. Raises ValueError for a bad address or port.
    """
    if version not in (1, 2):
        raise ValueError(f"PROXY protocol version must be 1 or 2, not {version}")
    if source is None or destination is None:
        return _V1_PREFIX + b"UNKNOWN\r\n" if version == 1 else _v2(_V2_LOCAL, _AF_UNSPEC, b"")
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        src, dst = _mapped(src), _mapped(dst)
    sport, dport = _port(source[1]), _port(destination[1])
    if version == 1:
        protocol = b"TCP4" if src.version == 4 else b"TCP6"
        line = b"%s %s %s %d %d\r\n" % (
            protocol,
            str(src).encode(),
            str(dst).encode(),
            sport,
            dport,
        )
        return _V1_PREFIX + line
    family = _AF_INET if src.version == 4 else _AF_INET6
    return _v2(_V2_PROXY, family, src.packed + dst.packed + struct.pack("!HH", sport, dport))


def _v2(command: int, family: int, addresses: bytes) -> bytes:
    transport = _STREAM if family != _AF_UNSPEC else 0
    return (
        _V2_SIGNATURE
        + bytes(((_V2_VERSION << 4) | command, (family << 4) | transport))
        + struct.pack("!H", len(addresses))
        + addresses
    )


def _ip(text: str) -> _IP:
    return ipaddress.ip_address(text.split("%", 1)[0])  # a scope id has no place on the wire


def _mapped(ip: _IP) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


def _port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return port
