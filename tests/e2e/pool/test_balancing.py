"""Rule 8, load balancing over real upstream sockets: smooth weighted round robin, refusing
servers and servers that do not accept within `timeouts.connect` skipped, least_conn counting
open tunnels as well as in-flight requests.

Each server answers with its name and `Connection: close`, so every request is a fresh pick,
and counts the connections the proxy closed, so a test knows when an exchange is over.
"""

from __future__ import annotations

import collections
import socket
import threading
from typing import Any

import pytest

from tests.support.clients import free_port, http, raw_client, read_response
from tests.support.configs import address, proxy_yaml
from tests.support.peers import Backend, blackhole, named_tunnel, served_by
from tests.support.waiting import WAIT, eventually
from tests.support.wire import assert_short_error


def balanced_yaml(servers: list[Any], balance: str = "round_robin", **timeouts: Any) -> str:
    """One upstream over `servers` (ports, or {address:, weight:} mappings)."""
    return proxy_yaml(servers, upstream={"balance": balance}, timeouts={"drain": 1, **timeouts})


def weighted(*servers: tuple[Backend, int]) -> list[dict[str, Any]]:
    return [{"address": backend.address, "weight": weight} for backend, weight in servers]


def named(raw_upstream, *names: str, hold: threading.Event | None = None) -> list[Backend]:
    return [Backend(raw_upstream, name, close=True, hold=hold) for name in names]


@pytest.mark.parametrize("balance", ["round_robin", "least_conn"])
def test_refused_server_is_skipped(make_proxy, raw_upstream, balance):
    """Rule 8: "A server that refuses the connection is skipped and the next one tried"."""
    (good,) = named(raw_upstream, "good")
    proxy = make_proxy(balanced_yaml([free_port(), good.port], balance))
    for i in range(4):
        assert served_by(proxy.address, f"/{i}") == "good"
    assert len(good.requests) == 4


def test_refused_server_is_skipped_for_an_upgrade(make_proxy, raw_upstream):
    """Rule 8: "A server that refuses the connection is skipped and the next one tried (before
    any byte was sent)" - an upgrade too: the tunnel opens on the next server."""
    (good,) = named(raw_upstream, "good")
    proxy = make_proxy(balanced_yaml([free_port(), good.port]))
    for _ in range(2):
        tunnel = named_tunnel(proxy.address)
        with tunnel.sock:
            assert (tunnel.status, tunnel.server) == (101, "good")


def test_all_servers_refusing_is_502(make_proxy):
    """Rule 7: "upstream refused ... 502"; rule 8: each refusing server is skipped and the next
    one tried - when none is left the client gets a short 502, and keeps its connection."""
    proxy = make_proxy(balanced_yaml([free_port() for _ in range(3)]))
    with raw_client(proxy.address) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, _ = read_response(sock)
            assert status == 502
            assert_short_error(body)


def test_round_robin_weights_3_to_1(make_proxy, raw_upstream):
    a, b = named(raw_upstream, "a", "b")
    proxy = make_proxy(balanced_yaml(weighted((a, 3), (b, 1))))
    picks = [served_by(proxy.address, f"/{i}") for i in range(8)]
    assert picks.count("a") == 6, picks
    assert picks.count("b") == 2, picks
    # Deterministic: every cycle of 4 holds exactly one pick of b.
    assert picks[:4].count("b") == 1, picks
    assert picks[4:] == picks[:4], picks


def test_round_robin_5_1_1_is_smooth_and_repeats(make_proxy, raw_upstream):
    """Rule 8: "`round_robin` honours weights deterministically". README: "nginx's smooth
    weighted round robin ... (`5,1,1` gives `a a b a c a a`)". Three cycles of 7 picks."""
    a, b, c = named(raw_upstream, "a", "b", "c")
    proxy = make_proxy(balanced_yaml(weighted((a, 5), (b, 1), (c, 1))))
    picks = [served_by(proxy.address, f"/{i}") for i in range(21)]
    assert picks[:7] == ["a", "a", "b", "a", "c", "a", "a"], picks
    assert picks[7:14] == picks[:7], picks
    assert picks[14:] == picks[:7], picks


def test_least_conn_counts_open_tunnels(make_proxy, raw_upstream):
    """While a tunnel is open its server carries 1, the other 0: every request goes to the
    other; once the tunnel closes, both take requests again."""
    a, b = named(raw_upstream, "a", "b")
    proxy = make_proxy(balanced_yaml([a.port, b.port], "least_conn"))
    by_name = {"a": a, "b": b}
    tunnel = named_tunnel(proxy.address)
    try:
        assert tunnel.echo(b"ping") == b"ping"  # the tunnel is open
        held = by_name[tunnel.server]
        other = b if held is a else a
        assert (len(held.requests), other.requests) == (1, [])
        for i in range(4):
            assert served_by(proxy.address, f"/during/{i}") == other.name, i
            other.wait_closed(i + 1)  # the proxy is done with this request
        assert len(held.requests) == 1
    finally:
        tunnel.close()

    # Both halves close: the tunnel ends and its server is released.
    held.wait_closed(1)
    assert eventually(lambda: proxy.tunnels_active() == 0)
    picks = collections.Counter()
    for i in range(4):
        picks[name := served_by(proxy.address, f"/after/{i}")] += 1
        by_name[name].wait_closed(len(by_name[name].requests))
    assert set(picks) == {"a", "b"}, picks


def test_least_conn_counts_in_flight_requests(make_proxy, raw_upstream):
    """Rule 8: "`least_conn` counts open tunnels as well as in-flight requests": while one
    request is held on a server, every new request goes to the other one."""
    hold = threading.Event()
    a, b = named(raw_upstream, "a", "b", hold=hold)
    proxy = make_proxy(balanced_yaml([a.port, b.port], "least_conn"))
    held = raw_client(proxy.address, timeout=WAIT)
    try:
        held.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert eventually(lambda: len(a.requests) + len(b.requests) == 1)
        busy, other = (a, b) if a.requests else (b, a)
        for i in range(4):
            assert served_by(proxy.address, f"/during/{i}") == other.name, i
        hold.set()
        assert read_response(held)[2] == busy.name.encode()
    finally:
        hold.set()
        held.close()


def test_server_not_accepting_within_connect_timeout_is_skipped(make_proxy, raw_upstream):
    """README rule 8: "A server that refuses the connection or does not accept it within
    `timeouts.connect` is skipped ... and the next one is tried"; README rule 7: with no
    server accepting within `timeouts.connect`, **504**."""
    hole, fillers = blackhole()
    try:
        with socket.socket() as probe:
            probe.settimeout(0.3)
            try:
                probe.connect(hole.getsockname())
                pytest.skip("cannot make a non-accepting listener on this kernel")
            except TimeoutError:
                pass
        (good,) = named(raw_upstream, "good")
        silent = address(hole.getsockname()[1])
        proxy = make_proxy(balanced_yaml([silent, good.port], connect="300ms"))
        for i in range(3):
            assert served_by(proxy.address, f"/{i}") == "good"
        alone = make_proxy(balanced_yaml([silent], connect="300ms"))
        status, _, body = http(alone.address)
        assert status == 504
        assert_short_error(body)
    finally:
        for s in fillers:
            s.close()
        hole.close()
