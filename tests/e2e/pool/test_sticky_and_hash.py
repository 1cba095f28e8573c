"""Rule 9 over real sockets: balance: hash (every key kind, remap, bounded load) and
the proxy's sticky cookie."""

from __future__ import annotations

import collections
import socket
from typing import Any

import pytest

from tests.support.certs import client_context
from tests.support.clients import http, read_response
from tests.support.configs import FAST_DRAIN, listener, proxy_yaml
from tests.support.peers import Backend, named_tunnel, served_by
from tests.support.waiting import eventually
from upgradeproxy.config.loader import parse_config


def pool_yaml(backends: list[Backend], *, listen: Any = 0, **keys: Any) -> str:
    """A proxy in front of `backends` as upstream `app`; `keys` are more of its keys."""
    return proxy_yaml([b.port for b in backends], upstream=keys, listen=listen,
                      timeouts=FAST_DRAIN)  # fmt: skip


@pytest.fixture
def three(raw_upstream) -> list[Backend]:
    return [Backend(raw_upstream, n) for n in "abc"]


KINDS = [
    pytest.param("header:X-User", lambda k: ("/", b"X-User: " + k.encode() + b"\r\n", None),
                 id="header"),
    pytest.param("cookie:sid", lambda k: ("/", b"Cookie: t=1; sid=" + k.encode() + b"\r\n", None),
                 id="cookie"),
    pytest.param("query:room", lambda k: (f"/ws?x=1&room={k}", b"", None), id="query"),
    pytest.param("client_ip", lambda k: ("/", b"", f"127.0.0.{10 + int(k[1:])}"), id="client-ip"),
]  # fmt: skip


@pytest.mark.parametrize(("hash_key", "request_for"), KINDS)
def test_same_key_reaches_same_server(make_proxy, three, hash_key, request_for):
    proxy = make_proxy(pool_yaml(three, balance="hash", hash_key=hash_key))
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for _ in range(3):
        for i in range(12):
            path, extra, source = request_for(f"k{i}")
            seen[f"k{i}"].add(served_by(proxy.address, path, extra, source))
    assert all(len(servers) == 1 for servers in seen.values()), seen
    assert len(set.union(*seen.values())) >= 2, "12 keys over 3 servers all hashed to one"


def test_request_without_the_key_is_round_robin(make_proxy, three):
    proxy = make_proxy(pool_yaml(three, balance="hash", hash_key="header:X-User"))
    picks = "".join(served_by(proxy.address) for _ in range(6))
    assert sorted(picks[:3]) == ["a", "b", "c"], picks
    assert picks[3:] == picks[:3], picks


def test_adding_a_tenth_server_moves_at_most_a_fifth_of_keys_only_to_it(make_proxy, raw_upstream):
    backends = [Backend(raw_upstream, f"s{i}") for i in range(10)]
    keys = {"balance": "hash", "hash_key": "query:k"}
    proxy = make_proxy(pool_yaml(backends[:9], **keys))

    def mapping() -> dict[int, str]:
        return {i: served_by(proxy.address, f"/?k=key{i}") for i in range(300)}

    before = mapping()
    proxy.reload(parse_config(pool_yaml(backends, **keys), "test.yaml"))
    after = mapping()
    moved = [i for i in range(300) if before[i] != after[i]]
    assert 0 < len(moved) <= 60, len(moved)
    assert {after[i] for i in moved} == {"s9"}


def test_bounded_load_spreads_one_hot_key(make_proxy, raw_upstream):
    """20 tunnels of one key over 4 servers: none above 8 (the bound makes it 7)."""
    four = [Backend(raw_upstream, n) for n in "abcd"]
    proxy = make_proxy(pool_yaml(four, balance="hash", hash_key="query:room"))
    tunnels = [named_tunnel(proxy.address, "/ws?room=hot") for _ in range(20)]
    try:
        assert all(t.status == 101 for t in tunnels)
        counts = collections.Counter(t.server for t in tunnels)
        assert sum(counts.values()) == 20
        assert max(counts.values()) <= 8, counts
        assert tunnels[0].echo() == b"ping"
    finally:
        for t in tunnels:
            t.close()


def test_sticky_cookie_set_then_honoured_and_stripped(make_proxy, three):
    proxy = make_proxy(pool_yaml(three, sticky_cookie="upx"))
    status, headers, body = http(proxy.address)
    assert status == 200
    cookie = headers[b"set-cookie"]
    name, _, rest = cookie.partition(b"=")
    token, _, attributes = rest.partition(b";")
    assert name == b"upx"
    assert attributes.strip() == b"Path=/; HttpOnly; SameSite=Lax"
    assert b"127.0.0.1" not in token
    for b in three:
        assert str(b.port).encode() not in token
    first = body.decode()
    for i in range(6):  # round robin would rotate; the cookie pins
        extra = b"Cookie: theme=dark; upx=" + token + b"; lang=en\r\n"
        status, headers, body = http(proxy.address, f"/{i}", extra=extra)
        assert (status, body.decode()) == (200, first)
        assert b"set-cookie" not in headers  # already pinned there
    server = next(b for b in three if b.name == first)
    for head in server.requests[1:]:
        assert b"upx=" not in head
        assert b"Cookie: theme=dark; lang=en\r\n" in head


def test_sticky_cookie_alone_is_dropped_with_its_header(make_proxy, three):
    proxy = make_proxy(pool_yaml(three, sticky_cookie="upx"))
    token = http(proxy.address)[1][b"set-cookie"].split(b";")[0].split(b"=")[1]
    http(proxy.address, "/only", extra=b"Cookie: upx=" + token + b"\r\n")
    head = next(h for b in three for h in b.requests if h.startswith(b"GET /only "))
    assert b"cookie:" not in head.lower()


def test_sticky_cookie_on_a_101_and_a_stale_cookie_is_replaced(make_proxy, three):
    proxy = make_proxy(pool_yaml(three, sticky_cookie="upx"))
    tunnel = named_tunnel(proxy.address, extra=b"Cookie: upx=0000000000000000\r\n")
    try:
        assert tunnel.status == 101
        cookie = tunnel.headers[b"set-cookie"]
        assert cookie.startswith(b"upx=")
        token = cookie.split(b";")[0].split(b"=")[1]
        assert token != b"0000000000000000"
        pinned = named_tunnel(proxy.address, extra=b"Cookie: upx=" + token + b"\r\n")
        assert pinned.server == tunnel.server
        assert b"set-cookie" not in pinned.headers
        pinned.close()
    finally:
        tunnel.close()
    assert eventually(lambda: proxy.tunnels_active() == 0)


def test_sticky_cookie_is_secure_on_a_tls_listener(make_proxy, three, ca, listener_tls):
    proxy = make_proxy(pool_yaml(three, sticky_cookie="upx", listen=listener(tls=listener_tls)))
    ctx = client_context(ca)
    with (
        socket.create_connection(proxy.address, timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _, _ = read_response(sock)
    assert status == 200
    assert headers[b"set-cookie"].endswith(b"; Path=/; HttpOnly; SameSite=Lax; Secure")


def test_cookie_ids_agree_across_proxies(make_proxy, three):
    """Two proxies (workers, replicas, a restart) give a server the same cookie value."""
    yaml = pool_yaml(three, sticky_cookie="upx")
    one, two = make_proxy(yaml), make_proxy(yaml)
    token = http(one.address)[1][b"set-cookie"].split(b";")[0]
    first = served_by(one.address, "/", b"Cookie: " + token + b"\r\n")
    for _ in range(3):
        assert served_by(two.address, "/", b"Cookie: " + token + b"\r\n") == first
