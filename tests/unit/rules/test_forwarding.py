"""Table tests for `upgradeproxy.rules.forwarding` (interface.md rules 3 and 4)."""

from __future__ import annotations

import ipaddress

import pytest

from upgradeproxy.rules.forwarding import (
    Hop,
    forwarding_headers,
    is_trusted,
    upstream_request_headers,
    via_value,
)

VIA = b"1.1 upgradeproxy"


def nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(
    ("ip", "networks", "expected"),
    [
        pytest.param("127.0.0.1", (), False, id="no-networks-trust-nobody"),
        pytest.param("127.0.0.1", nets("127.0.0.1/32"), True, id="exact-host"),
        pytest.param("10.1.2.3", nets("10.0.0.0/8"), True, id="inside-cidr"),
        pytest.param("11.0.0.1", nets("10.0.0.0/8"), False, id="outside-cidr"),
        pytest.param("192.168.1.1", nets("10.0.0.0/8", "192.168.0.0/16"), True,
                     id="second-network"),
        pytest.param("::ffff:127.0.0.1", nets("127.0.0.1/32"), True, id="v4-mapped-v6"),
        pytest.param("::ffff:10.0.0.1", nets("127.0.0.0/8"), False, id="v4-mapped-v6-outside"),
        pytest.param("::1", nets("::1/128"), True, id="ipv6"),
        pytest.param("2001:db8::5", nets("2001:db8::/32"), True, id="ipv6-cidr"),
        pytest.param("2001:db9::5", nets("2001:db8::/32"), False, id="ipv6-outside"),
        pytest.param("fe80::1%eth0", nets("fe80::/10"), True, id="ipv6-scope-id"),
        pytest.param("::1", nets("127.0.0.0/8"), False, id="v6-loopback-not-v4-loopback"),
        pytest.param("not-an-ip", nets("0.0.0.0/0"), False, id="unparsable-never-trusted"),
        pytest.param("", nets("0.0.0.0/0"), False, id="empty-never-trusted"),
    ],
)
def test_is_trusted(ip, networks, expected):
    assert is_trusted(ip, networks) is expected


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        pytest.param(b"1.1", b"1.1 upgradeproxy", id="http-1.1"),
        pytest.param(b"1.0", b"1.0 upgradeproxy", id="http-1.0-rfc9110-7.6.3"),
    ],
)
def test_via_value(version, expected):
    assert via_value(version) == expected


CLIENT_FWD = [
    (b"X-Forwarded-For", b"1.2.3.4"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"evil.example"),
    (b"Forwarded", b"for=1.2.3.4;proto=https"),
]
BASE = [(b"Host", b"app.example"), (b"Cookie", b"c=1")]


def untrusted(ip="127.0.0.1", host=b"app.example", proto=b"http"):
    return Hop(client_ip=ip, proto=proto, host=host, trusted=False)


def trusted(ip="127.0.0.1", host=b"app.example", proto=b"http"):
    return Hop(client_ip=ip, proto=proto, host=host, trusted=True)


@pytest.mark.parametrize(
    ("headers", "hop", "expected"),
    [
        pytest.param(
            BASE, untrusted(),
            [*BASE, (b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http"),
             (b"X-Forwarded-Host", b"app.example"), (b"Via", VIA)],
            id="added-when-absent",
        ),
        pytest.param(
            BASE + CLIENT_FWD, untrusted(),
            [*BASE, (b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http"),
             (b"X-Forwarded-Host", b"app.example"), (b"Via", VIA)],
            id="untrusted-client-values-replaced-forwarded-dropped",
        ),
        pytest.param(
            [*BASE, (b"x-forwarded-for", b"1.2.3.4"), (b"X-FORWARDED-PROTO", b"https")],
            untrusted(),
            [*BASE, (b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http"),
             (b"X-Forwarded-Host", b"app.example"), (b"Via", VIA)],
            id="untrusted-replacement-case-insensitive",
        ),
        pytest.param(
            BASE + CLIENT_FWD, trusted(),
            [*BASE, (b"X-Forwarded-For", b"1.2.3.4, 127.0.0.1"), (b"X-Forwarded-Proto", b"https"),
             (b"X-Forwarded-Host", b"evil.example"),
             (b"Forwarded", b"for=1.2.3.4;proto=https, for=127.0.0.1;proto=http"),
             (b"Via", VIA)],
            id="trusted-appended-rfc7239",
        ),
        pytest.param(
            [*BASE, (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2"), (b"X-Forwarded-For", b"3.3.3.3")],
            trusted(ip="10.0.0.9"),
            [*BASE, (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"),
             (b"X-Forwarded-Proto", b"http"), (b"X-Forwarded-Host", b"app.example"),
             (b"Via", VIA)],
            id="trusted-several-xff-fields-joined",
        ),
        pytest.param(
            BASE, trusted(),
            [*BASE, (b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http"),
             (b"X-Forwarded-Host", b"app.example"), (b"Via", VIA)],
            id="trusted-without-client-values-no-forwarded-invented",
        ),
        pytest.param(
            [*BASE, (b"Forwarded", b"for=1.2.3.4")], trusted(ip="2001:db8::1", proto=b"https"),
            [*BASE, (b"X-Forwarded-For", b"2001:db8::1"), (b"X-Forwarded-Proto", b"https"),
             (b"X-Forwarded-Host", b"app.example"),
             (b"Forwarded", b'for=1.2.3.4, for="[2001:db8::1]";proto=https'), (b"Via", VIA)],
            id="ipv6-bracketed-and-quoted-in-forwarded-rfc7239-6",
        ),
        pytest.param(
            BASE, untrusted(ip="::1"),
            [*BASE, (b"X-Forwarded-For", b"::1"), (b"X-Forwarded-Proto", b"http"),
             (b"X-Forwarded-Host", b"app.example"), (b"Via", VIA)],
            id="ipv6-plain-in-xff",
        ),
        pytest.param(
            [(b"Cookie", b"c=1")], untrusted(host=None),
            [(b"Cookie", b"c=1"), (b"X-Forwarded-For", b"127.0.0.1"),
             (b"X-Forwarded-Proto", b"http"), (b"Via", VIA)],
            id="no-host-no-x-forwarded-host",
        ),
        pytest.param(
            [*BASE, (b"Via", b"1.0 fred")], untrusted(proto=b"https"),
            [*BASE, (b"Via", b"1.0 fred"), (b"X-Forwarded-For", b"127.0.0.1"),
             (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"app.example"),
             (b"Via", VIA)],
            id="via-appended-after-client-via-rfc9110-7.6.3",
        ),
    ],
)
def test_forwarding_headers(headers, hop, expected):
    """Rule 4: replaced for an untrusted peer, appended to for a trusted one; Via always."""
    assert forwarding_headers(headers, hop) == expected


def test_forwarding_headers_via_follows_request_version():
    hop = Hop(client_ip="127.0.0.1", proto=b"http", host=b"a", trusted=False,
              http_version=b"1.0")
    assert forwarding_headers([], hop)[-1] == (b"Via", b"1.0 upgradeproxy")


WS_E2E = [
    (b"Host", b"app.example"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Origin", b"https://app.example"),
    (b"Cookie", b"c=1"),
    (b"Authorization", b"Bearer t"),
]
OURS = [(b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"app.example"), (b"Via", VIA)]


@pytest.mark.parametrize(
    ("headers", "hop", "offer", "framing", "expected"),
    [
        pytest.param(
            [*WS_E2E, (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"h2c, websocket")],
            untrusted(), [b"websocket"], [],
            [*WS_E2E, *OURS, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")],
            id="offer-readded-end-to-end-unchanged-rule-1",
        ),
        pytest.param(
            [*WS_E2E, (b"Connection", b"Upgrade"), (b"Upgrade", b"SPDY/3.1, websocket")],
            untrusted(), [b"SPDY/3.1", b"websocket"], [],
            [*WS_E2E, *OURS, (b"Connection", b"upgrade"), (b"Upgrade", b"SPDY/3.1, websocket")],
            id="several-protocols-client-order",
        ),
        pytest.param(
            [*WS_E2E, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
            untrusted(), [], [],
            [*WS_E2E, *OURS], id="no-offer-plain-request",
        ),
        pytest.param(
            [*WS_E2E, (b"Connection", b"X-Forwarded-For"), (b"X-Forwarded-For", b"1.2.3.4")],
            untrusted(), [], [],
            [*WS_E2E, *OURS], id="nominated-xff-cannot-remove-ours-untrusted",
        ),
        pytest.param(
            [*WS_E2E, (b"Connection", b"X-Forwarded-For, Via"), (b"X-Forwarded-For", b"1.2.3.4")],
            trusted(), [], [],
            [*WS_E2E, *OURS], id="nominated-xff-removed-first-even-when-trusted-rule-3",
        ),
        pytest.param(
            [*WS_E2E, (b"Connection", b"Host, X-Secret"), (b"X-Secret", b"s")],
            untrusted(), [], [],
            [*WS_E2E, *OURS], id="host-survives-nomination",
        ),
        pytest.param(
            [*WS_E2E, (b"Keep-Alive", b"1"), (b"Proxy-Connection", b"keep-alive"),
             (b"TE", b"trailers"), (b"Trailer", b"X-T"), (b"Transfer-Encoding", b"chunked"),
             (b"Proxy-Authorization", b"Basic eDp5"), (b"HTTP2-Settings", b"AAMAAABk")],
            untrusted(), [], [(b"Transfer-Encoding", b"chunked")],
            [*WS_E2E, *OURS, (b"Transfer-Encoding", b"chunked")],
            id="hop-by-hop-gone-framing-last",
        ),
        pytest.param(
            [*WS_E2E, (b"Content-Length", b"5"), (b"Connection", b"upgrade"),
             (b"Upgrade", b"websocket")],
            untrusted(), [b"websocket"], [(b"Content-Length", b"5")],
            [*WS_E2E, *OURS, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket"),
             (b"Content-Length", b"5")],
            id="upgrade-with-body",
        ),
    ],
)
def test_upstream_request_headers(headers, hop, offer, framing, expected):
    """Rules 1, 3, 4 together: client hop-by-hop first, then ours, then offer and framing."""
    assert upstream_request_headers(headers, hop, offer, framing) == expected
