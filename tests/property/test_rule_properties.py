"""Properties of routing, config value parsing, the balancer and the PROXY protocol parser."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from upgradeproxy.config import values
from upgradeproxy.config.model import Address, Route, Server
from upgradeproxy.pool.balancer import Balancer
from upgradeproxy.pool.hashring import Ring
from upgradeproxy.rules.proxy_header import proxy_header
from upgradeproxy.rules.proxy_protocol import NEED_MORE, ProxyProtocolError, parse_proxy_header
from upgradeproxy.rules.routing import Router, normalize_host, split_target

# --- routing --------------------------------------------------------------------------

_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_host = st.lists(_label, min_size=1, max_size=3).map(".".join)
_segment = st.text(alphabet="abcxyz019-_.~%", max_size=5)
_path = st.lists(_segment, max_size=4).map(lambda parts: "/" + "/".join(parts))
_route = st.builds(
    Route,
    upstream=st.sampled_from(["a", "b", "c"]),
    host=st.none() | _host | _host.map(lambda h: "*." + h),
    path_prefix=_path,
)
_query = st.none() | st.text(alphabet="a=&b/?", max_size=8)


@given(st.lists(_route, min_size=1, max_size=6), st.none() | _host, _path)
def test_the_first_matching_route_wins(routes: list[Route], host: str | None, path: str) -> None:
    router = Router(routes)
    chosen = router.match(host, path)
    matching = [r for r in routes if Router([r]).match(host, path) is not None]
    assert chosen is (matching[0] if matching else None)


@given(
    st.lists(_route, min_size=1, max_size=6),
    _host,
    _path,
    _query,
    st.sampled_from(["origin", "absolute-http", "absolute-https"]),
)
def test_a_route_prefix_always_prefixes_the_target_sent_upstream(
    routes: list[Route], host: str, path: str, query: str | None, form: str
) -> None:
    origin = path + ("?" + query if query is not None else "")
    if form == "origin":
        target, hs = origin.encode(), [(b"Host", host.encode())]
    else:
        scheme = form.split("-")[1]
        target, hs = f"{scheme}://{host}{origin}".encode(), [(b"Host", b"other.example")]
    authority, route_path, sent, _ = split_target(b"GET", target, hs)
    route = Router(routes).match(normalize_host(authority), route_path)
    assume(route is not None)
    assert route is not None
    assert sent.startswith(route.path_prefix.encode())
    assert sent.startswith(b"/")
    assert normalize_host(authority) == host


# --- config values --------------------------------------------------------------------


def _value_error(parse: Callable[[str], object], text: str) -> str | None:
    """The ValueError message `parse(text)` raises, or None; any other exception propagates."""
    try:
        parse(text)
    except ValueError as exc:
        return str(exc)
    return None


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h"]))
def test_a_duration_parses_back_to_what_was_written(n: int, unit: str) -> None:
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    assert values.parse_duration(f"{n}{unit}") == n * scale
    assert values.parse_duration(f" {n}{unit} ") == n * scale
    # Units are case-sensitive ("5M" is months to nginx): an upper-case unit is a problem.
    with pytest.raises(ValueError, match="case-sensitive"):
        values.parse_duration(f"{n}{unit.upper()}")


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_a_number_of_seconds_formatted_by_repr_parses_back(seconds: float) -> None:
    assert values.parse_duration(seconds) == seconds
    text = repr(seconds)
    assume("e" not in text)  # the config grammar has no exponent form
    assert values.parse_duration(text) == float(text)


@given(st.text(max_size=12))
def test_a_duration_parser_raises_only_value_error(text: str) -> None:
    problem = _value_error(values.parse_duration, text)
    assert problem is None or "expected a duration" in problem


_address = st.builds(
    Address,
    host=st.one_of(
        _host.filter(lambda h: not h.replace(".", "").isdigit()),
        st.ip_addresses().map(str),
    ),
    port=st.integers(min_value=0, max_value=65535),
)


@given(_address)
def test_an_address_parses_from_its_own_string(address: Address) -> None:
    assert values.parse_address(str(address)) == address


@given(st.text(max_size=40))
def test_the_address_parser_raises_only_value_error(text: str) -> None:
    problem = _value_error(values.parse_address, text)
    if problem is not None:
        assert "expected host:port" in problem
    else:
        parsed = values.parse_address(text)
        assert values.parse_address(str(parsed)) == parsed
        if ":" in parsed.host:
            ipaddress.IPv6Address(parsed.host)


# --- the balancer ---------------------------------------------------------------------


@given(
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=5),
    st.integers(min_value=0, max_value=40),
)
def test_round_robin_honours_weights_over_any_window(weights: list[int], start: int) -> None:
    servers = [Server(Address("127.0.0.1", 1000 + i), w) for i, w in enumerate(weights)]
    balancer = Balancer(servers, "round_robin")
    total = sum(weights)
    picks = [balancer.order()[0] for _ in range(start + total)]
    window = Counter(picks[start:])
    assert {s: window[s] for s in servers} == {s: s.weight for s in servers}


@given(
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=4),
    st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=4),
)
def test_order_lists_every_server_once(weights: list[int], active: list[int]) -> None:
    servers = [Server(Address("127.0.0.1", 2000 + i), w) for i, w in enumerate(weights)]
    for policy in ("round_robin", "least_conn"):
        balancer = Balancer(servers, policy)  # type: ignore[arg-type]
        for server, n in zip(servers, active, strict=False):
            for _ in range(n):
                balancer.acquire(server)
        order = balancer.order()
        assert sorted(order, key=servers.index) == servers
        if policy == "least_conn":
            load = [balancer.active(s) / s.weight for s in order]
            assert load[0] == min(load)


# --- the PROXY protocol parser --------------------------------------------------------

_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
_pp_bytes = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=300).map(lambda b: _SIG + b),
    st.tuples(
        st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b"tcp4", b""]),
        st.lists(st.text(alphabet="0123456789abcdef.: ", max_size=20), max_size=5),
        st.sampled_from([b"\r\n", b"\n", b"", b"\r\nGET /"]),
    ).map(lambda t: b"PROXY " + t[0] + b" " + " ".join(t[1]).encode() + t[2]),
)


@given(_pp_bytes)
def test_the_proxy_parser_raises_only_its_own_error(buf: bytes) -> None:
    try:
        result = parse_proxy_header(buf)
    except ProxyProtocolError:
        return
    if result is NEED_MORE:
        assert len(buf) < 536
        return
    header, used = result
    assert 0 < used <= len(buf)
    assert header.version in (1, 2)
    # Whatever followed the header is the client's, untouched: the same header parses
    # from the prefix alone.
    assert parse_proxy_header(buf[:used]) == (header, used)


# --- the consistent-hash ring ------------------------------------------------------------

_members = st.lists(
    st.tuples(st.sampled_from([f"10.0.0.{i}:9000" for i in range(12)]), st.integers(1, 4)),
    min_size=2, max_size=8, unique_by=lambda m: m[0],
)  # fmt: skip
_keys = st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=40)


@given(_members, _keys)
def test_the_ring_gives_a_key_the_same_owner_every_time(members, keys) -> None:
    first, again = Ring(members), Ring(list(members))
    for key in keys:
        assert members[first.owner(key)] == members[again.owner(key)]
        walked = list(first.walk(key))
        assert sorted(walked) == list(range(len(members)))  # every server once


@given(_members, _keys, st.data())
def test_removing_a_server_moves_only_its_keys(members, keys, data) -> None:
    gone = data.draw(st.integers(0, len(members) - 1))
    before = Ring(members)
    rest = [m for i, m in enumerate(members) if i != gone]
    after = Ring(rest)
    for key in keys:
        owner = members[before.owner(key)]
        if owner != members[gone]:
            assert rest[after.owner(key)] == owner
        else:
            # The removed server's keys go to the next server on the old ring.
            nxt = members[list(before.walk(key))[1]]
            assert rest[after.owner(key)] == nxt


# --- the PROXY header builder ------------------------------------------------------------

_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).map(lambda a: str(a) if a.ipv4_mapped is None else "::1")
_port = st.integers(0, 65535)


@given(st.sampled_from([1, 2]), st.one_of(
    st.tuples(st.tuples(_v4, _port), st.tuples(_v4, _port)),
    st.tuples(st.tuples(_v6, _port), st.tuples(_v6, _port)),
))  # fmt: skip
def test_a_built_header_parses_back_and_each_prefix_needs_more(version, addresses) -> None:
    source, dest = addresses
    built = proxy_header(version, source, dest)
    header, used = parse_proxy_header(built + b"GET / HTTP/1.1\r\n")  # type: ignore[misc]
    assert used == len(built)
    assert header.version == version
    norm = lambda a: (ipaddress.ip_address(a[0]).compressed, a[1])  # noqa: E731
    assert (norm(header.source), norm(header.dest)) == (norm(source), norm(dest))
    for cut in range(len(built)):
        assert parse_proxy_header(built[:cut]) is NEED_MORE
