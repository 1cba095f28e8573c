"""Table tests for rule 14's client address and per-address counts (rules/limits.py)."""

from __future__ import annotations

import ipaddress

import pytest

from upgradeproxy.rules.limits import AddressCounts, client_address

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def xff(*values: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"X-Forwarded-For", v) for v in values]


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        pytest.param(
            "192.0.2.1", xff(b"198.51.100.7"), "192.0.2.1", id="untrusted-peer-xff-ignored"
        ),
        pytest.param("10.0.0.1", [], "10.0.0.1", id="trusted-peer-no-xff"),
        pytest.param("10.0.0.1", xff(b"198.51.100.7"), "198.51.100.7", id="trusted-one-hop"),
        pytest.param(
            "10.0.0.1",
            xff(b"203.0.113.9, 198.51.100.7, 10.0.0.2"),
            "198.51.100.7",
            id="skips-trusted-hops-takes-last-untrusted",
        ),
        pytest.param(
            "10.0.0.1",
            xff(b"203.0.113.9", b"198.51.100.7"),
            "198.51.100.7",
            id="several-fields",
        ),
        pytest.param("10.0.0.1", xff(b"10.0.0.3, 10.0.0.2"), "10.0.0.3", id="all-trusted-leftmost"),
        pytest.param(
            "10.0.0.1",
            xff(b"198.51.100.7, garbage, 10.0.0.2"),
            "10.0.0.2",
            id="garbage-stops-at-last-good-hop",
        ),
        pytest.param("10.0.0.1", xff(b"garbage"), "10.0.0.1", id="garbage-only-peer"),
        pytest.param("fd00::1", xff(b"2001:db8::7"), "2001:db8::7", id="ipv6"),
        pytest.param("10.0.0.1", xff(b"\xff\xfe"), "10.0.0.1", id="non-ascii"),
    ],
)
def test_client_address_is_what_xff_names_last_before_trusted_hops(peer, headers, expected):
    assert client_address(peer, headers, TRUSTED) == expected


def test_counts_refuse_at_the_limit_and_forget_addresses_at_zero():
    counts = AddressCounts()
    assert counts.acquire("a", 2)
    assert counts.acquire("a", 2)
    assert not counts.acquire("a", 2)
    assert counts.acquire("b", 2)
    counts.release("a")
    assert counts.acquire("a", 2)
    for address in ("a", "a", "b"):
        counts.release(address)
    assert counts.counts == {}


def test_zero_limit_never_refuses():
    counts = AddressCounts()
    assert all(counts.acquire("a", 0) for _ in range(100))
