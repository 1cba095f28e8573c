"""Parser for the HAProxy PROXY protocol header, versions 1 (text) and 2 (binary).

Pure: bytes in, a `ProxyHeader` out. The caller keeps reading until `parse_proxy_header`
stops answering `NEED_MORE`, and gives up once it holds `MAX_HEADER_BYTES`. Every prefix of
a valid header answers `NEED_MORE`; a prefix that can no longer become one raises at once, so
a client that is not speaking PROXY is turned away without waiting for a timeout.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (section numbers below).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the load balancer saw; `source` is None for v2 LOCAL, v1 UNKNOWN and non-IP families."""

    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    version: int


class ProxyProtocolError(ValueError):
    """The bytes cannot be (the start of) a PROXY header."""


class NeedMore(enum.Enum):
    """Type of the `NEED_MORE` sentinel (an enum so `is NEED_MORE` narrows for mypy)."""

    NEED_MORE = "NEED_MORE"


NEED_MORE: Final = NeedMore.NEED_MORE

# §2.1: a v1 line is at most 107 bytes, CRLF included ("PROXY UNKNOWN" + 92 bytes of junk).
V1_MAX_BYTES: Final = 107
# §2.2: 16 fixed bytes, then at most 216 address bytes (AF_UNIX) before any TLVs.
V2_HEADER_BYTES: Final = 16
# §2.2 recommends that senders keep the whole header within 536 bytes, the minimal TCP MSS, so
# it arrives in one segment. That covers v1 (107) and v2 with addresses (<= 232) plus TLVs; a
# v2 header announcing more is refused rather than waited for.
MAX_HEADER_BYTES: Final = 536

_V1_PREFIX: Final = b"PROXY "
_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")
# Characters a TCP4/TCP6 line may hold before its CRLF: addresses, ports, single spaces.
_V1_ADDRESS_CHARS: Final = frozenset(b"0123456789abcdefABCDEF.: ")
_V1_MAX_PORT_DIGITS: Final = 5

_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_VERSION: Final = 0x2
_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1
_AF_UNSPEC: Final = 0x0
_AF_INET: Final = 0x1
_AF_INET6: Final = 0x2
_AF_UNIX: Final = 0x3
_STREAM: Final = 0x1
_KNOWN_TRANSPORTS: Final = frozenset({0x0, 0x1, 0x2})  # UNSPEC, STREAM, DGRAM
# §2.2: address block sizes per family (src addr, dst addr, src port, dst port).
_V2_ADDRESS_BYTES: Final = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_V2_TLV_HEADER_BYTES: Final = 3  # type (1) + length (2)

_Result: TypeAlias = tuple[ProxyHeader, int] | NeedMore


def parse_proxy_header(buf: bytes) -> tuple[ProxyHeader, int] | NeedMore:
    """Parse the PROXY header at the start of `buf`.

    Returns:
        `(header, used)`, where `buf[used:]` is the client's own data, or `NEED_MORE` when
        `buf` is a valid but incomplete prefix of a header.

    Raises:
        ProxyProtocolError: `buf` does not start with a valid PROXY header.
    """
    if not buf:
        return NEED_MORE
    if buf[0] == _V1_PREFIX[0]:
        return _parse_v1(buf)
    if buf[0] == _V2_SIGNATURE[0]:
        return _parse_v2(buf)
    raise ProxyProtocolError("not a PROXY protocol header")


# --- version 1 (§2.1) -----------------------------------------------------------------------


def _parse_v1(buf: bytes) -> _Result:
    """Parse a v1 text line once its CRLF has arrived."""
    if not buf.startswith(_V1_PREFIX):
        if _V1_PREFIX.startswith(buf):
            return NEED_MORE
        raise ProxyProtocolError("not a PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        _check_v1_prefix(buf[:V1_MAX_BYTES])
        if len(buf) >= V1_MAX_BYTES:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX_BYTES} bytes")
        return NEED_MORE
    return _parse_v1_line(buf[len(_V1_PREFIX) : end]), end + 2


def _check_v1_prefix(line: bytes) -> None:
    """Raise if an incomplete v1 line can no longer become a valid one."""
    body = line[len(_V1_PREFIX) :]
    if b"\n" in body or b"\r" in body[:-1]:
        raise ProxyProtocolError("stray CR or LF in PROXY v1 line")
    cr_seen = body.endswith(b"\r")
    protocol, space, rest = body.removesuffix(b"\r").partition(b" ")
    if space or cr_seen:
        if protocol not in _V1_PROTOCOLS:
            raise ProxyProtocolError(f"unknown PROXY v1 protocol {protocol!r}")
    elif not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
        raise ProxyProtocolError(f"unknown PROXY v1 protocol {protocol!r}")
    if protocol != b"UNKNOWN" and not _V1_ADDRESS_CHARS.issuperset(rest):
        raise ProxyProtocolError("invalid character in PROXY v1 line")


def _parse_v1_line(body: bytes) -> ProxyHeader:
    """Parse what follows "PROXY " up to (not including) the CRLF."""
    protocol, _, rest = body.partition(b" ")
    if protocol == b"UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(source=None, dest=None, version=1)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"unknown PROXY v1 protocol {protocol!r}")
    fields = rest.split(b" ")
    if len(fields) != 4:
        raise ProxyProtocolError("PROXY v1 line needs exactly 4 fields after the protocol")
    src_ip, dst_ip, src_port, dst_port = fields
    ip_version = 4 if protocol == b"TCP4" else 6
    return ProxyHeader(
        source=(_v1_ip(src_ip, ip_version), _v1_port(src_port)),
        dest=(_v1_ip(dst_ip, ip_version), _v1_port(dst_port)),
        version=1,
    )


def _v1_ip(raw: bytes, ip_version: int) -> str:
    """Validate a v1 address of the given family and return it in canonical form."""
    text = raw.decode("ascii", "replace")
    # `ipaddress` would accept an IPv6 scope ("fe80::1%eth0"); no sender emits one.
    if "%" in text:
        raise ProxyProtocolError(f"invalid PROXY v1 address {raw!r}")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"invalid PROXY v1 address {raw!r}") from None
    if ip.version != ip_version:
        raise ProxyProtocolError(f"PROXY v1 address {raw!r} is not IPv{ip_version}")
    return str(ip)


def _v1_port(raw: bytes) -> int:
    """Validate a v1 port: 1 to 5 ASCII digits, at most 65535 (leading zeros tolerated)."""
    # bytes.isdigit() is ASCII-only, unlike int(), which also takes "+1", " 1" and "1_0".
    if not raw.isdigit() or len(raw) > _V1_MAX_PORT_DIGITS or int(raw) > 0xFFFF:
        raise ProxyProtocolError(f"invalid PROXY v1 port {raw!r}")
    return int(raw)


# --- version 2 (§2.2) -----------------------------------------------------------------------


def _parse_v2(buf: bytes) -> _Result:
    """Parse a v2 binary header once all of its announced length has arrived."""
    if len(buf) < len(_V2_SIGNATURE):
        if _V2_SIGNATURE.startswith(buf):
            return NEED_MORE
        raise ProxyProtocolError("bad PROXY v2 signature")
    if not buf.startswith(_V2_SIGNATURE):
        raise ProxyProtocolError("bad PROXY v2 signature")
    # After the 12-byte signature: byte 12 is version << 4 | command, byte 13 is
    # family << 4 | transport, bytes 14-15 the big-endian length of everything that follows.
    if len(buf) > len(_V2_SIGNATURE):
        _check_version_command(buf[12])
    if len(buf) < V2_HEADER_BYTES:
        return NEED_MORE
    command, family_transport = buf[12] & 0x0F, buf[13]
    (length,) = struct.unpack_from("!H", buf, 14)
    total = V2_HEADER_BYTES + length
    if total > MAX_HEADER_BYTES:
        raise ProxyProtocolError(f"PROXY v2 header of {total} bytes exceeds {MAX_HEADER_BYTES}")
    if command == _V2_PROXY:
        # Checked before waiting for the body so a hopeless header fails early.
        _check_family(family_transport, length)
    if len(buf) < total:
        return NEED_MORE
    body = buf[V2_HEADER_BYTES:total]
    if command == _V2_LOCAL:
        # §2.2: for LOCAL the receiver "must discard the protocol block including the family".
        return ProxyHeader(source=None, dest=None, version=2), total
    family = family_transport >> 4
    if family != _AF_UNSPEC:
        # §2.2: with AF_UNSPEC the receiver ignores the block, so it need not hold TLVs.
        _check_tlvs(body[_V2_ADDRESS_BYTES[family] :])
    source, dest = _v2_addresses(family, body)
    return ProxyHeader(source=source, dest=dest, version=2), total


def _check_version_command(byte: int) -> None:
    """Raise unless the 13th byte holds version 2 and a LOCAL or PROXY command."""
    if byte >> 4 != _V2_VERSION:
        raise ProxyProtocolError(f"unsupported PROXY v2 version {byte >> 4}")
    if byte & 0x0F not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"unknown PROXY v2 command {byte & 0x0F}")


def _check_family(family_transport: int, length: int) -> None:
    """Raise on an unknown family or transport, a non-stream socket, or a short address block."""
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family not in _V2_ADDRESS_BYTES or transport not in _KNOWN_TRANSPORTS:
        raise ProxyProtocolError(f"unknown PROXY v2 family/transport 0x{family_transport:02x}")
    # We proxy TCP: a datagram (or unspecified) transport for a real family makes no sense here.
    if family != _AF_UNSPEC and transport != _STREAM:
        raise ProxyProtocolError(f"PROXY v2 transport 0x{family_transport:02x} is not STREAM")
    if length < _V2_ADDRESS_BYTES[family]:
        raise ProxyProtocolError(f"PROXY v2 length {length} too short for its address family")


def _check_tlvs(tlvs: bytes) -> None:
    """Raise unless the bytes after the addresses are whole TLVs (their contents are ignored)."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < _V2_TLV_HEADER_BYTES:
            raise ProxyProtocolError("truncated PROXY v2 TLV")
        (value_length,) = struct.unpack_from("!H", tlvs, offset + 1)
        offset += _V2_TLV_HEADER_BYTES + value_length
        if offset > len(tlvs):
            raise ProxyProtocolError("PROXY v2 TLV overruns the header")


def _v2_addresses(
    family: int, body: bytes
) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """Decode the address block; AF_UNSPEC and AF_UNIX carry no (ip, port) and give None."""
    if family == _AF_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
    elif family == _AF_INET6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
    else:
        return None, None
    return (
        (str(ipaddress.ip_address(src)), sport),
        (str(ipaddress.ip_address(dst)), dport),
    )
