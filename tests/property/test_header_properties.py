"""Properties of the header rules (rules/headers.py, rules/forwarding.py) over generated lists."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tests.property.strategies import header_name, headers, headers_with_connection, token
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules.forwarding import Hop, forwarding_headers, upstream_request_headers

_OURS = {b"x-forwarded-for", b"x-forwarded-proto"}


def _names(hs: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {n.lower() for n, _ in hs}


@given(headers_with_connection)
def test_hop_by_hop_removal_is_idempotent(hs: list[tuple[bytes, bytes]]) -> None:
    once = hdr.strip_hop_by_hop(hs)
    assert hdr.strip_hop_by_hop(once) == once


@given(headers_with_connection)
def test_nothing_named_in_connection_survives_except_host(hs: list[tuple[bytes, bytes]]) -> None:
    named = hdr.connection_tokens(hs) - {b"host"}
    left = _names(hdr.strip_hop_by_hop(hs))
    assert not left & named
    assert not left & hdr.HOP_BY_HOP
    assert not left & {b"content-length", b"transfer-encoding"}


@given(headers_with_connection)
def test_stripping_keeps_every_other_field_in_order(hs: list[tuple[bytes, bytes]]) -> None:
    drop = hdr.HOP_BY_HOP | hdr.connection_tokens(hs) | {b"content-length", b"transfer-encoding"}
    expected = [(n, v) for n, v in hs if n.lower() not in drop or n.lower() == b"host"]
    assert hdr.strip_hop_by_hop(hs) == expected


_hop = st.builds(
    Hop,
    client_ip=st.ip_addresses().map(str),
    proto=st.sampled_from([b"http", b"https"]),
    host=st.none() | st.just(b"example.com"),
    trusted=st.booleans(),
)


@given(headers_with_connection, _hop, st.lists(token, max_size=2))
def test_the_proxys_own_headers_always_survive(
    hs: list[tuple[bytes, bytes]], hop: Hop, offer: list[bytes]
) -> None:
    out = upstream_request_headers(hs, hop, offer, [(b"Content-Length", b"3")])
    names = [n.lower() for n, _ in out]
    for own in _OURS:
        assert names.count(own) == 1, own
    assert names.count(b"content-length") == 1
    # A client's Via is history and stays; this hop's element comes after it.
    assert hdr.get_all(out, b"via")[-1] == b"1.1 upgradeproxy"
    if offer:
        assert hdr.get_all(out, b"upgrade") == [b", ".join(offer)]
        assert hdr.connection_tokens(out) == {b"upgrade"}
    else:
        assert b"upgrade" not in names
        assert b"connection" not in names


@given(headers, _hop.filter(lambda h: not h.trusted))
def test_x_forwarded_for_from_an_untrusted_peer_is_exactly_the_peer(
    hs: list[tuple[bytes, bytes]], hop: Hop
) -> None:
    out = forwarding_headers(hs, hop)
    assert hdr.get_all(out, b"x-forwarded-for") == [hop.client_ip.encode()]
    assert hdr.get_all(out, b"x-forwarded-proto") == [hop.proto]
    assert hdr.get_all(out, b"forwarded") == []
    ipaddress.ip_address(hdr.get_all(out, b"x-forwarded-for")[0].decode())


@given(headers, _hop.filter(lambda h: h.trusted))
def test_x_forwarded_for_from_a_trusted_peer_ends_with_the_peer(
    hs: list[tuple[bytes, bytes]], hop: Hop
) -> None:
    xff = hdr.get_all(forwarding_headers(hs, hop), b"x-forwarded-for")
    assert len(xff) == 1
    assert xff[0].rsplit(b", ", 1)[-1] == hop.client_ip.encode()


_offer_tokens = st.lists(
    st.one_of(token, st.sampled_from([b"websocket", b"WebSocket", b"h2c", b"SPDY/3.1", b"a/b/c"])),
    max_size=6,
)
_allow = st.lists(st.sampled_from([b"websocket", b"h2c", b"spdy", b"spdy/3.1", b"foo"]), max_size=4)


@given(_offer_tokens, _allow)
def test_the_upgrade_allow_list_never_adds_a_token(
    offered: list[bytes], allow: list[bytes]
) -> None:
    kept = hdr.allowed_protocols(offered, allow)
    assert all(t in offered for t in kept)
    # A subsequence, in the client's order.
    it = iter(offered)
    assert all(any(t is o or t == o for o in it) for t in kept)
    assert all(any(hdr.protocol_matches(t, a) for a in allow) for t in kept)


@given(_offer_tokens, _allow, st.sampled_from([b"GET", b"POST"]), st.booleans())
def test_upgrade_offer_only_offers_what_the_client_sent(
    offered: list[bytes], allow: list[bytes], method: bytes, with_connection: bool
) -> None:
    hs = [(b"Upgrade", b", ".join(offered))] if offered else []
    if with_connection:
        hs.append((b"Connection", b"Upgrade"))
    hs += [(b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"Sec-WebSocket-Version", b"13")]
    offer, key = hdr.upgrade_offer(method, b"1.1", hs, allow)
    assert all(t in offered for t in offer)
    if not with_connection:
        assert offer == []
    if key is not None:
        assert any(hdr.protocol_name(t) == b"websocket" for t in offer)


@given(headers, header_name)
def test_get_all_and_comma_list_agree(hs: list[tuple[bytes, bytes]], name: bytes) -> None:
    name = name.lower()
    joined = b",".join(hdr.get_all(hs, name))
    assert hdr.comma_list(hs, name) == [p.strip() for p in joined.split(b",") if p.strip()]
