"""Rules 10 and 11 over real sockets: active health checks, all-down 503, max_tunnels,
slow_start, counts and health across a reload, /upstreams and the per-server gauges."""

from __future__ import annotations

import collections
import logging
import signal
import time
from typing import Any

import pytest

from tests.support.certs import server_context, write_ca
from tests.support.clients import free_port, http
from tests.support.configs import proxy_yaml
from tests.support.metrics import admin_json, metrics_text
from tests.support.peers import Backend, named_tunnel, served_by
from tests.support.waiting import eventually
from upgradeproxy.config.loader import parse_config


def check(interval: float, timeout: float = 0.5, healthy_after: int = 1,
          unhealthy_after: int = 1, **more: Any) -> dict[str, Any]:  # fmt: skip
    """A `health_check` on /healthz."""
    return {"path": "/healthz", "interval": interval, "timeout": timeout,
            "healthy_after": healthy_after, "unhealthy_after": unhealthy_after, **more}  # fmt: skip


FAST_CHECK = check(0.05, 0.5, 2, 2)
WS_CHECK = check(0.05, 0.5, 2, 2, upgrade="websocket")


def pool_yaml(
    backends: list[Backend], *, listen: int = 0, admin: int = 0, drain: int = 1, **keys: Any
) -> str:
    """A proxy in front of `backends` as upstream `app` (`keys` are more of its keys), with an
    admin listener: /upstreams and the per-server gauges are read."""
    return proxy_yaml([b.port for b in backends], upstream=keys, listen=listen, admin=admin,
                      timeouts={"drain": drain})  # fmt: skip


def rotation(proxy, n: int = 6) -> set[str]:
    return {served_by(proxy.address, f"/r{i}") for i in range(n)}


def upstreams(proxy) -> dict:
    return admin_json(proxy.admin_port)["app"]


def healthy(proxy, backend: Backend) -> bool:
    server = next(s for s in upstreams(proxy)["servers"] if s["address"] == backend.address)
    return server["healthy"]


@pytest.fixture
def two(raw_upstream) -> list[Backend]:
    return [Backend(raw_upstream, n) for n in "ab"]


@pytest.mark.parametrize(
    ("health", "bad"),
    [
        pytest.param(FAST_CHECK, "fail", id="http-503"),
        pytest.param(FAST_CHECK, "garbage", id="http-garbage"),
        pytest.param(FAST_CHECK, "reset", id="http-reset"),
        pytest.param(WS_CHECK, "bad-accept", id="ws-accept"),
        pytest.param(WS_CHECK, "no-101", id="ws-no-101"),
    ],
)  # fmt: skip
def test_failing_server_leaves_and_rejoins_the_rotation(make_proxy, two, caplog, health, bad):
    _a, b = two
    proxy = make_proxy(pool_yaml(two, health_check=health))
    assert eventually(lambda: len(b.checks) >= 2)
    assert rotation(proxy) == {"a", "b"}
    with caplog.at_level(logging.WARNING, logger="upgradeproxy"):
        b.health = bad
        assert eventually(lambda: not healthy(proxy, b))
    assert rotation(proxy) == {"a"}
    assert any("server " + b.address + " is down" in r.getMessage() for r in caplog.records)
    last = next(s for s in upstreams(proxy)["servers"] if s["address"] == b.address)["last_check"]
    assert last["passed"] is False
    assert last["result"] != "ok"
    b.health = "ok"
    assert eventually(lambda: healthy(proxy, b))
    assert rotation(proxy) == {"a", "b"}


def test_hanging_health_endpoint_goes_down_and_never_blocks_clients(make_proxy, two):
    _a, b = two
    proxy = make_proxy(pool_yaml(two, health_check=check(0.1, timeout=1)))
    b.health = "hang"
    for i in range(10):  # while checks hang, requests are served at once
        started = time.monotonic()
        assert http(proxy.address, f"/during{i}")[0] == 200
        assert time.monotonic() - started < 0.5
    assert eventually(lambda: not healthy(proxy, b))
    last = next(s for s in upstreams(proxy)["servers"] if s["address"] == b.address)["last_check"]
    assert last["result"] == "no answer within 1s"


def test_every_server_down_is_503_at_once(make_proxy, two):
    proxy = make_proxy(pool_yaml(two, health_check=check(2)))
    for backend in two:
        backend.health = "fail"
    assert eventually(lambda: not any(s["healthy"] for s in upstreams(proxy)["servers"]), 5)
    served = [b.served() for b in two]
    started = time.monotonic()
    status, headers, _ = http(proxy.address, "/x")
    assert time.monotonic() - started < 1.0
    assert status == 503
    assert headers[b"retry-after"] == b"2"
    tunnel = named_tunnel(proxy.address)
    assert tunnel.status == 503
    assert b"retry-after" in tunnel.headers
    tunnel.close()
    assert [b.served() for b in two] == served  # no server was asked


def test_health_checks_use_tls_to_a_tls_upstream(make_proxy, ws_upstream, ca, tmp_path):
    ca_path = write_ca(ca, tmp_path / "ca.pem")
    up = ws_upstream(ssl=server_context(ca))
    health = check(0.05, timeout=1, upgrade="websocket")
    proxy = make_proxy(
        proxy_yaml(up.port, upstream={"tls": {"ca": str(ca_path)}, "health_check": health},
                   admin=0, timeouts={"drain": 1})
    )  # fmt: skip
    assert eventually(lambda: len(up.requests) >= 2)
    last = upstreams(proxy)["servers"][0]["last_check"]
    assert last["result"] == "ok"
    assert up.requests[0].path == "/healthz"


def test_max_tunnels_503_then_recovery(make_proxy, raw_upstream):
    a = Backend(raw_upstream, "a")
    proxy = make_proxy(pool_yaml([a], max_tunnels=2))
    held = [named_tunnel(proxy.address) for _ in range(2)]
    try:
        assert [t.status for t in held] == [101, 101]
        refused = named_tunnel(proxy.address)
        assert refused.status == 503
        assert refused.headers[b"retry-after"] == b"1"
        refused.close()
        assert served_by(proxy.address) == "a"  # plain requests still reach a full server
        held.pop().close()
        assert eventually(lambda: proxy.tunnels_active() == 1)
        again = named_tunnel(proxy.address)
        assert again.status == 101
        held.append(again)
    finally:
        for t in held:
            t.close()


def test_full_server_is_skipped_for_tunnels(make_proxy, two):
    proxy = make_proxy(pool_yaml(two, max_tunnels=1))
    tunnels = [named_tunnel(proxy.address) for _ in range(2)]
    try:
        assert sorted(t.server for t in tunnels) == ["a", "b"]
        assert named_tunnel(proxy.address).status == 503
    finally:
        for t in tunnels:
            t.close()


def test_least_conn_counts_survive_a_reload(make_proxy, two):
    """The issue's case: 6 tunnels over A and B, close the 3 on A, SIGHUP, 3 more: A, A, A."""
    proxy = make_proxy(pool_yaml(two, balance="least_conn"))
    again = pool_yaml(two, balance="least_conn", drain=2)
    tunnels = [named_tunnel(proxy.address) for _ in range(6)]
    assert collections.Counter(t.server for t in tunnels) == {"a": 3, "b": 3}
    for t in [t for t in tunnels if t.server == "a"]:
        t.close()
    assert eventually(lambda: proxy.tunnels_active() == 3)
    proxy.reload(parse_config(again, "test.yaml"))
    more = [named_tunnel(proxy.address) for _ in range(3)]
    try:
        assert [t.server for t in more] == ["a", "a", "a"]
        admin = upstreams(proxy)["servers"]
        assert [s["tunnels"] for s in admin] == [3, 3]
    finally:
        for t in tunnels + more:
            t.close()


def test_health_survives_a_reload(make_proxy, two):
    _a, b = two
    proxy = make_proxy(pool_yaml(two, health_check=check(0.05, healthy_after=50)))
    again = pool_yaml(two, health_check=check(0.05, healthy_after=50), drain=2)
    b.health = "fail"
    assert eventually(lambda: not healthy(proxy, b))
    b.health = "ok"  # 50 passes to come back: far longer than this test looks
    proxy.reload(parse_config(again, "test.yaml"))
    assert not healthy(proxy, b)
    assert rotation(proxy) == {"a"}


def test_slow_start_ramps_a_server_added_by_reload(make_proxy, two):
    a, _b = two
    proxy = make_proxy(pool_yaml([a], slow_start="1h"))
    proxy.reload(parse_config(pool_yaml(two, slow_start="1h"), "test.yaml"))
    picks = collections.Counter(served_by(proxy.address, f"/s{i}") for i in range(22))
    assert picks["b"] == 2, picks  # 0.1 of a's weight: one in eleven
    plain = make_proxy(pool_yaml([a]))
    plain.reload(parse_config(pool_yaml(two), "test.yaml"))
    picks = collections.Counter(served_by(plain.address, f"/p{i}") for i in range(22))
    assert picks["b"] == 11, picks


def test_upstreams_endpoint_and_gauges(make_proxy, two):
    a, b = two
    proxy = make_proxy(pool_yaml(two, balance="least_conn", health_check=check(0.05)))
    b.health = "fail"
    assert eventually(lambda: not healthy(proxy, b))
    tunnel = named_tunnel(proxy.address)
    try:
        assert tunnel.server == "a"
        doc = upstreams(proxy)
        assert doc["balance"] == "least_conn"
        assert doc["health_check"] is True
        sa, sb = doc["servers"]
        assert (sa["address"], sa["weight"], sa["healthy"]) == (a.address, 1, True)
        assert (sa["tunnels"], sa["in_flight"]) == (1, 0)
        assert sa["last_check"]["passed"] is True
        assert sa["last_check"]["result"] == "ok"
        assert abs(sa["last_check"]["time"] - time.time()) < 10
        assert (sb["healthy"], sb["tunnels"]) == (False, 0)
        assert sb["last_check"]["result"] == "status 503"
        text = metrics_text(proxy.admin_port)
        assert f'upgradeproxy_upstream_healthy{{server="{a.address}",upstream="app"}} 1.0' in text
        assert f'upgradeproxy_upstream_healthy{{server="{b.address}",upstream="app"}} 0.0' in text
        assert f'upgradeproxy_upstream_tunnels{{server="{a.address}",upstream="app"}} 1.0' in text
    finally:
        tunnel.close()
    assert eventually(lambda: proxy.tunnels_active() == 0)
    text = metrics_text(proxy.admin_port)
    assert f'upgradeproxy_upstream_tunnels{{server="{a.address}",upstream="app"}} 0.0' in text


def test_down_servers_keys_go_to_the_next_and_come_back(make_proxy, raw_upstream):
    three = [Backend(raw_upstream, n) for n in "abc"]
    b = three[1]
    proxy = make_proxy(
        pool_yaml(three, balance="hash", hash_key="query:k", health_check=check(0.05))
    )

    def mapping() -> dict[int, str]:
        return {i: served_by(proxy.address, f"/?k={i}") for i in range(60)}

    before = mapping()
    assert "b" in before.values()
    b.health = "fail"
    assert eventually(lambda: not healthy(proxy, b))
    during = mapping()
    assert "b" not in during.values()
    assert all(during[i] == before[i] for i in before if before[i] != "b")
    b.health = "ok"
    assert eventually(lambda: healthy(proxy, b))
    assert mapping() == before


def test_sticky_cookie_to_a_down_server_is_replaced(make_proxy, two):
    b = two[1]
    proxy = make_proxy(pool_yaml(two, sticky_cookie="upx", health_check=check(0.05)))
    cookies = {}
    while len(cookies) < 2:  # round robin gives each server its turn
        _, headers, body = http(proxy.address)
        cookies[body.decode()] = headers[b"set-cookie"].split(b";")[0]
    b.health = "fail"
    assert eventually(lambda: not healthy(proxy, b))
    status, headers, body = http(proxy.address, extra=b"Cookie: " + cookies["b"] + b"\r\n")
    assert (status, body) == (200, b"a")
    assert headers[b"set-cookie"].split(b";")[0] == cookies["a"]


def test_least_conn_counts_survive_a_real_sighup(run_proxy, two):
    """The issue's case against `upgradeproxy run`, reloaded by the signal itself."""
    port, admin = free_port(), free_port()
    proc = run_proxy(pool_yaml(two, listen=port, admin=admin, balance="least_conn"))
    tunnels = [named_tunnel(port) for _ in range(6)]
    try:
        assert collections.Counter(t.server for t in tunnels) == {"a": 3, "b": 3}
        for t in [t for t in tunnels if t.server == "a"]:
            t.close()
        assert eventually(
            lambda: [s["tunnels"] for s in admin_json(admin)["app"]["servers"]] == [0, 3]
        )
        proc.rewrite(pool_yaml(two, listen=port, admin=admin, balance="least_conn", drain=2))
        proc.signal(signal.SIGHUP)
        proc.wait_log("reloaded")
        tunnels += [named_tunnel(port) for _ in range(3)]
        assert [t.server for t in tunnels[6:]] == ["a", "a", "a"]
    finally:
        for t in tunnels:
            t.close()
