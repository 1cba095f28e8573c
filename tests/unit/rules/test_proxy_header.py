"""Round-trip table tests for the PROXY header builder: build -> parse -> same addresses."""

from __future__ import annotations

import ipaddress

import pytest

from upgradeproxy.rules.proxy_header import proxy_header
from upgradeproxy.rules.proxy_protocol import parse_proxy_header

# How this Python spells ::ffff:192.0.2.7 (3.13 writes the dotted form, 3.11 does not).
MAPPED = str(ipaddress.ip_address("::ffff:192.0.2.7"))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    ("source", "destination", "parsed"),
    [
        pytest.param(("192.0.2.7", 51234), ("10.0.0.1", 443), None, id="ipv4"),
        pytest.param(("2001:db8::7", 65535), ("2001:db8::1", 8080), None, id="ipv6"),
        pytest.param(("127.0.0.1", 1), ("127.0.0.1", 0), None, id="port-edges"),
        pytest.param(("::1", 40000), ("::1", 80), None, id="ipv6-loopback"),
        pytest.param(
            ("192.0.2.7", 5000), ("2001:db8::1", 443),
            ((MAPPED, 5000), ("2001:db8::1", 443)), id="mixed-families-mapped",
        ),
        pytest.param(
            ("2001:0db8:0000::7", 5000), ("2001:db8::1", 443),
            (("2001:db8::7", 5000), ("2001:db8::1", 443)), id="ipv6-canonical",
        ),
        pytest.param(
            ("fe80::1%eth0", 5000), ("fe80::2", 443),
            (("fe80::1", 5000), ("fe80::2", 443)), id="scope-id-dropped",
        ),
    ],
)  # fmt: skip
def test_built_header_parses_back_to_the_same_addresses(version, source, destination, parsed):
    built = proxy_header(version, source, destination)
    header, used = parse_proxy_header(built + b"GET / HTTP/1.1\r\n")
    assert used == len(built)
    assert header.version == version
    assert (header.source, header.dest) == (parsed or (source, destination))


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (1, b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n"),
        (
            2,
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            b"\xc0\x00\x02\x07\x0a\x00\x00\x01\xc8\x22\x01\xbb",
        ),
    ],
)
def test_exact_bytes(version, expected):
    assert proxy_header(version, ("192.0.2.7", 51234), ("10.0.0.1", 443)) == expected


@pytest.mark.parametrize("version", [1, 2])
def test_no_address_is_unknown_or_local(version):
    built = proxy_header(version, None, ("10.0.0.1", 443))
    header, used = parse_proxy_header(built)
    assert (header.source, header.dest, used) == (None, None, len(built))


@pytest.mark.parametrize(
    ("version", "source"),
    [(3, ("127.0.0.1", 1)), (1, ("not-an-ip", 1)), (2, ("127.0.0.1", 70000))],
)
def test_bad_input_raises_value_error(version, source):
    with pytest.raises(ValueError, match=r"version|does not appear to be|port"):
        proxy_header(version, source, ("127.0.0.1", 80))
