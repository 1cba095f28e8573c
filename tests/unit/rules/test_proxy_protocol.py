"""PROXY protocol v1/v2 parsing, against the HAProxy spec (doc/proxy-protocol.txt)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from upgradeproxy.rules.proxy_protocol import (
    MAX_HEADER_BYTES,
    NEED_MORE,
    ProxyHeader,
    ProxyProtocolError,
    parse_proxy_header,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PAYLOAD = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def v2(
    body: bytes,
    *,
    ver_cmd: int = 0x21,
    fam: int = 0x11,
    length: int | None = None,
) -> bytes:
    """A v2 header: signature, version/command, family/transport, length, body."""
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", size) + body


def addresses(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v2 address block: packed source and destination IPs, then the two ports."""
    packed = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    return packed + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V4_BODY = addresses("192.0.2.1", "198.51.100.2", 56324, 443)
V6_BODY = addresses("2001:db8::1", "2001:db8::2", 4242, 8080)
V4_SRC = ("192.0.2.1", 56324)
V4_DST = ("198.51.100.2", 443)
V6_SRC = ("2001:db8::1", 4242)
V6_DST = ("2001:db8::2", 8080)

# The longest v1 line the spec allows: "PROXY UNKNOWN" + junk, 107 bytes with CRLF.
V1_LONGEST = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
V1_TCP6_LONGEST = (
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)

VALID = [
    pytest.param(
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        ProxyHeader(V4_SRC, V4_DST, 1),
        id="v1-tcp4",
    ),
    pytest.param(
        b"PROXY TCP6 2001:db8::1 2001:db8::2 4242 8080\r\n",
        ProxyHeader(V6_SRC, V6_DST, 1),
        id="v1-tcp6",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:192.0.2.1 0 65535\r\n",
        ProxyHeader(("2001:db8::1", 0), ("::ffff:c000:201", 65535), 1),
        id="v1-tcp6-canonicalised-and-port-bounds",
    ),
    pytest.param(
        b"PROXY TCP4 192.0.2.1 198.51.100.2 00080 443\r\n",
        ProxyHeader(("192.0.2.1", 80), V4_DST, 1),
        id="v1-port-leading-zeros-tolerated",
    ),
    pytest.param(
        V1_TCP6_LONGEST,
        ProxyHeader(
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            1,
        ),
        id="v1-tcp6-longest",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", ProxyHeader(None, None, 1), id="v1-unknown"),
    pytest.param(
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ProxyHeader(None, None, 1),
        id="v1-unknown-with-ignored-addresses",
    ),
    pytest.param(V1_LONGEST, ProxyHeader(None, None, 1), id="v1-unknown-107-bytes"),
    pytest.param(v2(V4_BODY), ProxyHeader(V4_SRC, V4_DST, 2), id="v2-inet"),
    pytest.param(v2(V6_BODY, fam=0x21), ProxyHeader(V6_SRC, V6_DST, 2), id="v2-inet6"),
    pytest.param(
        v2(V4_BODY + tlv(0x01, b"h2") + tlv(0x04, b"\x00" * 5) + tlv(0x05, b"")),
        ProxyHeader(V4_SRC, V4_DST, 2),
        id="v2-inet-with-tlvs",
    ),
    pytest.param(
        v2(V6_BODY + tlv(0xEA, b"vpce-0123456789abcdef"), fam=0x21),
        ProxyHeader(V6_SRC, V6_DST, 2),
        id="v2-inet6-with-tlv",
    ),
    pytest.param(v2(b"", ver_cmd=0x20, fam=0x00), ProxyHeader(None, None, 2), id="v2-local"),
    pytest.param(
        v2(V4_BODY, ver_cmd=0x20),
        ProxyHeader(None, None, 2),
        id="v2-local-discards-addresses",
    ),
    pytest.param(
        v2(b"\xff" * 7, ver_cmd=0x20, fam=0xFF),
        ProxyHeader(None, None, 2),
        id="v2-local-ignores-family",
    ),
    pytest.param(v2(b"", fam=0x00), ProxyHeader(None, None, 2), id="v2-proxy-unspec"),
    pytest.param(
        v2(b"\x01\x02", fam=0x00),
        ProxyHeader(None, None, 2),
        id="v2-proxy-unspec-ignores-block",
    ),
    pytest.param(
        v2(b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0"), fam=0x31),
        ProxyHeader(None, None, 2),
        id="v2-proxy-unix",
    ),
]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_valid_header(header: bytes, expected: ProxyHeader) -> None:
    """A whole header parses to its addresses and reports its exact length."""
    assert parse_proxy_header(header) == (expected, len(header))


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_trailing_bytes_are_left_for_the_client(header: bytes, expected: ProxyHeader) -> None:
    """The bytes after the header are the client's and are not consumed."""
    result = parse_proxy_header(header + PAYLOAD)
    assert result == (expected, len(header))


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_every_prefix_needs_more(header: bytes, expected: ProxyHeader) -> None:
    """Any strict prefix of a valid header, empty included, asks for more bytes."""
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is NEED_MORE, header[:end]


def test_header_fits_max_header_bytes() -> None:
    """The caller's read limit holds the longest v1 line and a v2 header with TLVs."""
    assert len(V1_LONGEST) == 107
    padded = v2(V6_BODY + tlv(0x04, b"\0" * (MAX_HEADER_BYTES - 16 - 36 - 3)), fam=0x21)
    assert len(padded) == MAX_HEADER_BYTES
    assert parse_proxy_header(padded) == (ProxyHeader(V6_SRC, V6_DST, 2), MAX_HEADER_BYTES)


INVALID = [
    # Not PROXY at all.
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http-request"),
    pytest.param(b"\x16\x03\x01\x02\x00", id="tls-client-hello"),
    pytest.param(b"PROXZ", id="v1-bad-prefix-early"),
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="v1-lowercase"),
    pytest.param(b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="v1-double-space"),
    # v1: protocol.
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", id="v1-udp4"),
    pytest.param(b"PROXY TCP5", id="v1-bad-protocol-early"),
    pytest.param(b"PROXY TCP4\r\n", id="v1-tcp4-no-fields"),
    pytest.param(b"PROXY UNKNOWNX\r\n", id="v1-unknown-suffix"),
    # v1: shape.
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", id="v1-trailing-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", id="v1-empty-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", id="v1-cr-without-lf"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", id="v1-108-bytes"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 200, id="v1-no-crlf-within-107"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 junk", id="v1-bad-char-early"),
    # v1: addresses.
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", id="v1-short-ipv4"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", id="v1-ipv4-octet-256"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", id="v1-ipv4-leading-zero"),
    pytest.param(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", id="v1-tcp4-with-ipv6"),
    pytest.param(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", id="v1-tcp6-with-ipv4"),
    pytest.param(b"PROXY TCP6 ::1 ::g 1 2\r\n", id="v1-bad-ipv6"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", id="v1-ipv6-scope"),
    pytest.param(b"PROXY TCP6 [::1] ::1 1 2\r\n", id="v1-ipv6-brackets"),
    # v1: ports.
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", id="v1-port-too-big"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", id="v1-port-negative"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", id="v1-port-plus"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", id="v1-port-underscore"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", id="v1-port-hex"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 000080 2\r\n", id="v1-port-six-digits"),
    pytest.param("PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(), id="v1-port-unicode-digit"),
    # v2: signature, version, command.
    pytest.param(b"\r\n\r\n\x00\r\nQUIT\r", id="v2-bad-signature"),
    pytest.param(b"\r\n\r\nX", id="v2-bad-signature-early"),
    pytest.param(b"\r\nGET", id="v2-bad-signature-crlf"),
    pytest.param(v2(V4_BODY, ver_cmd=0x11), id="v2-version-1"),
    pytest.param(v2(V4_BODY, ver_cmd=0x31), id="v2-version-3"),
    pytest.param(SIG + b"\x22", id="v2-command-2-early"),
    pytest.param(v2(V4_BODY, ver_cmd=0x2F), id="v2-command-15"),
    # v2: family, transport, length.
    pytest.param(v2(V4_BODY, fam=0x41), id="v2-family-4"),
    pytest.param(v2(V4_BODY, fam=0x13), id="v2-transport-3"),
    pytest.param(v2(V4_BODY, fam=0x12), id="v2-inet-dgram"),
    pytest.param(v2(V4_BODY, fam=0x10), id="v2-inet-transport-unspec"),
    pytest.param(v2(V6_BODY, fam=0x22), id="v2-inet6-dgram"),
    pytest.param(v2(V4_BODY[:11]), id="v2-inet-length-11"),
    pytest.param(v2(V4_BODY, fam=0x21), id="v2-inet6-length-12"),
    pytest.param(v2(b"\0" * 215, fam=0x31), id="v2-unix-length-215"),
    pytest.param(SIG + b"\x21\x11\x00\x0b", id="v2-short-length-before-body"),
    pytest.param(v2(b"", length=MAX_HEADER_BYTES - 15), id="v2-longer-than-max"),
    pytest.param(v2(b"", length=0xFFFF), id="v2-length-ffff"),
    # v2: TLVs.
    pytest.param(v2(V4_BODY + b"\x01"), id="v2-tlv-truncated-header"),
    pytest.param(v2(V4_BODY + b"\x01\x00\x05abc"), id="v2-tlv-overruns"),
    pytest.param(v2(V4_BODY + tlv(0x01, b"h2") + b"\x04\x00"), id="v2-tlv-trailing-bytes"),
]


@pytest.mark.parametrize("data", INVALID)
def test_invalid_header_raises(data: bytes) -> None:
    """Bytes that cannot start a PROXY header are refused at once, not waited on."""
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data)


def test_error_is_a_value_error() -> None:
    """Callers that catch ValueError also catch PROXY errors."""
    assert issubclass(ProxyProtocolError, ValueError)
