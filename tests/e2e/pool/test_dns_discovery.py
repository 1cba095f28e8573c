"""Servers found in DNS (interface.md rule 16), over real DNS on loopback: a DNS server the test
controls names pods listening on 127.0.0.2, 127.0.0.3, ... (one port, as behind a headless
Service), and a proxy (in a thread) discovers them every second.

Waits are on what the proxy shows (/upstreams, the lookup counter), never on the clock.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time

import pytest

from tests.support.clients import close_times, http, read_response
from tests.support.metrics import admin_json, scrape, value
from tests.support.peers import named_tunnel, served_by
from tests.support.pods import NAME, discover_yaml
from tests.support.waiting import eventually

SRV_NAME = "_ws._tcp.chat.test"


def admin(proxy) -> int:
    return proxy.admin_port


def page(proxy) -> dict:
    return admin_json(admin(proxy))["app"]


def listed(proxy) -> list[str]:
    return [server["address"] for server in page(proxy)["servers"]]


def lookups(proxy, result: str) -> float:
    families = scrape(admin(proxy))
    return value(families, "upgradeproxy_discovery_lookups_total", upstream="app", result=result)


def after_next_lookup(proxy, result: str) -> None:
    """Wait for a lookup with `result` that started after this call (two more counted: one may
    have been under way)."""
    start = lookups(proxy, result)
    assert eventually(lambda: lookups(proxy, result) >= start + 2), f"no {result} lookup"


def start(make_proxy, dns, pods, **keys):
    dns.set(NAME, A=[pod.host for pod in pods])
    proxy = make_proxy(discover_yaml(dns, pods[0].port, **keys))
    assert listed(proxy) == [pod.address for pod in pods]
    return proxy


# --- one server per address -----------------------------------------------------------------


def test_each_address_is_a_server_of_its_own(make_proxy, dns, make_pods):
    pods = make_pods(3)
    proxy = start(make_proxy, dns, pods)
    assert [served_by(proxy.address) for _ in range(6)] == [p.host for p in pods] * 2
    families = scrape(admin(proxy))
    assert value(families, "upgradeproxy_upstream_servers", upstream="app") == 3
    for pod in pods:
        labels = {"upstream": "app", "server": pod.address}
        assert value(families, "upgradeproxy_upstream_healthy", **labels) == 1


def test_an_address_that_joins_gets_traffic_after_the_next_lookup(make_proxy, dns, make_pods):
    a, b, late = make_pods(3)
    proxy = start(make_proxy, dns, [a, b])
    assert {served_by(proxy.address) for _ in range(4)} == {a.host, b.host}
    assert late.served() == 0
    dns.set(NAME, A=[a.host, b.host, late.host])
    assert eventually(lambda: late.address in listed(proxy))
    assert late.host in {served_by(proxy.address) for _ in range(3)}


def test_a_leaving_address_gets_no_new_work_and_its_tunnel_stays(make_proxy, dns, make_pods):
    pods = make_pods(2)
    proxy = start(make_proxy, dns, pods)
    tunnel = named_tunnel(proxy.address)
    leaving = next(p for p in pods if p.host == tunnel.server)
    staying = next(p for p in pods if p is not leaving)
    dns.set(NAME, A=[staying.host])
    assert eventually(lambda: listed(proxy) == [staying.address])
    assert page(proxy)["leaving"] == [{"address": leaving.address, "tunnels": 1}]
    before = leaving.served()
    assert {served_by(proxy.address) for _ in range(4)} == {staying.host}
    assert named_tunnel(proxy.address).server == staying.host
    assert leaving.served() == before
    after_next_lookup(proxy, "ok")
    assert tunnel.echo(b"still here") == b"still here"  # on_removal: keep
    tunnel.close()
    assert eventually(lambda: page(proxy)["leaving"] == [])


def test_with_drain_a_leaving_addresss_tunnels_close_spread_over_the_window(
    make_proxy, dns, make_pods
):
    leaving, staying = make_pods(2)
    proxy = start(
        make_proxy, dns, [leaving], discover={"on_removal": "drain"},
        timeouts={"connect": 1, "drain": 3},
    )  # fmt: skip
    tunnels = [named_tunnel(proxy.address) for _ in range(3)]
    assert {t.server for t in tunnels} == {leaving.host}
    dns.set(NAME, A=[staying.host])
    assert eventually(lambda: listed(proxy) == [staying.address])
    closed = close_times([tunnel.sock for tunnel in tunnels], time.monotonic())
    # Closed at the middles of three slices of the 3 s window (0.5, 1.5, 2.5 s after the
    # removal, which /upstreams showed up to a lookup's time late): spread, and inside it.
    assert closed[-1] - closed[0] >= 1.0, closed
    assert closed[-1] <= 3.0 + 1.0, closed  # the window, and a second for this thread to see it
    assert served_by(proxy.address) == staying.host


def test_an_address_that_comes_back_is_the_same_server(make_proxy, dns, make_pods):
    pods = make_pods(2)
    proxy = start(make_proxy, dns, pods, sticky_cookie="upx")
    tunnel = named_tunnel(proxy.address)
    cookie = tunnel.headers[b"set-cookie"].split(b";")[0]
    away = next(p for p in pods if p.host == tunnel.server)
    dns.set(NAME, A=[p.host for p in pods if p is not away])
    assert eventually(lambda: away.address not in listed(proxy))
    dns.set(NAME, A=[p.host for p in pods])
    assert eventually(lambda: away.address in listed(proxy))
    entry = next(s for s in page(proxy)["servers"] if s["address"] == away.address)
    assert entry["tunnels"] == 1  # the tunnel opened before it left still counts
    for _ in range(3):
        assert served_by(proxy.address, extra=b"Cookie: " + cookie + b"\r\n") == away.host
    tunnel.close()


# --- lookups that fail, and names that are gone ----------------------------------------------


@pytest.mark.parametrize("mode", ["servfail", "silent", "garbage", "cname-loop", "no-resolver"])
def test_a_failed_lookup_keeps_the_servers(make_proxy, dns, make_pods, mode):
    pods = make_pods(2)
    proxy = start(make_proxy, dns, pods)
    if mode == "cname-loop":
        dns.set(NAME, CNAME="loop.chat.test")
        dns.set("loop.chat.test", CNAME=NAME)
    elif mode == "no-resolver":
        dns.close()
    else:
        dns.mode[NAME] = mode
    after_next_lookup(proxy, "error")
    assert listed(proxy) == [pod.address for pod in pods]
    assert page(proxy)["discovery"]["result"] == "error"
    assert {served_by(proxy.address) for _ in range(4)} == {pod.host for pod in pods}


@pytest.mark.parametrize("gone", ["nxdomain", "no-records"])
def test_no_such_name_empties_the_set_until_it_is_back(make_proxy, dns, make_pods, gone):
    pods = make_pods(2)
    proxy = start(make_proxy, dns, pods)
    if gone == "nxdomain":
        dns.remove(NAME)
    else:
        dns.set(NAME)  # the name exists, with no A or AAAA record
    assert eventually(lambda: listed(proxy) == [])
    assert page(proxy)["discovery"]["result"] == "empty"
    status, headers, _ = http(proxy.address)
    assert (status, headers[b"retry-after"]) == (503, b"1")
    dns.set(NAME, A=[pods[1].host])
    assert eventually(lambda: listed(proxy) == [pods[1].address])
    assert served_by(proxy.address) == pods[1].host


def test_the_proxy_starts_when_the_first_lookup_fails(make_proxy, dns, make_pods, caplog):
    caplog.set_level(logging.INFO, logger="upgradeproxy")
    pod = make_pods(1)[0]
    dns.set(NAME, A=[pod.host])
    dns.mode[NAME] = "silent"
    proxy = make_proxy(discover_yaml(dns, pod.port))
    assert "upstream app: first lookup of chat.test failed" in caplog.text
    assert listed(proxy) == []
    status, headers, _ = http(proxy.address)
    assert (status, headers[b"retry-after"]) == (503, b"1")
    dns.mode[NAME] = "answer"
    assert eventually(lambda: listed(proxy) == [pod.address])
    assert served_by(proxy.address) == pod.host


# --- SRV --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["glue", "target-lookups", "truncated-to-tcp"])
def test_srv_records_give_each_target_its_port_and_weight(make_proxy, dns, make_pods, how):
    a, b = make_pods(1, first=2)[0], make_pods(1, first=3)[0]
    assert a.port != b.port
    dns.set("a.chat.test", A=[a.host])
    dns.set("b.chat.test", A=[b.host])
    srv = [(0, 3, a.port, "a.chat.test"), (0, 1, b.port, "b.chat.test"), (1, 9, 1, "c.chat.test")]
    dns.set(SRV_NAME, SRV=srv, glue=how == "glue")
    if how == "truncated-to-tcp":
        dns.mode[SRV_NAME] = "truncate"
    proxy = make_proxy(discover_yaml(dns, name=SRV_NAME))
    assert page(proxy)["servers"] == [
        {"address": a.address, "weight": 3, "healthy": True, "tunnels": 0, "in_flight": 0,
         "last_check": None},
        {"address": b.address, "weight": 1, "healthy": True, "tunnels": 0, "in_flight": 0,
         "last_check": None},
    ]  # fmt: skip
    assert [served_by(proxy.address) for _ in range(8)].count(a.host) == 6
    asked_targets = dns.asked("a.chat.test", "A")
    assert asked_targets == 0 if how == "glue" else asked_targets >= 1
    if how == "truncated-to-tcp":
        assert dns.asked(SRV_NAME, "SRV", "tcp") >= 1


def test_an_srv_target_without_an_address_is_left_out(make_proxy, dns, make_pods, caplog):
    caplog.set_level(logging.INFO, logger="upgradeproxy")
    pod = make_pods(1)[0]
    dns.set("a.chat.test", A=[pod.host])
    dns.set("none.chat.test")
    dns.set(SRV_NAME, SRV=[(0, 1, pod.port, "a.chat.test"), (0, 1, 9, "none.chat.test")])
    proxy = make_proxy(discover_yaml(dns, name=SRV_NAME))
    assert listed(proxy) == [pod.address]
    assert "SRV target none.chat.test has no address: left out" in caplog.text
    assert served_by(proxy.address) == pod.host


def test_a_name_with_500_addresses_is_cut_with_a_warning(make_proxy, dns, make_pods, caplog):
    caplog.set_level(logging.INFO, logger="upgradeproxy")
    pod = make_pods(1)[0]
    others = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(499)]
    dns.set(NAME, A=[pod.host, *others])
    proxy = make_proxy(discover_yaml(dns, pod.port, timeouts={"connect": 2, "drain": 1}))
    assert len(listed(proxy)) == 256
    assert listed(proxy)[0] == pod.address  # 127.0.0.2 is the lowest: kept
    assert "500 servers: only the first 256 by address are used" in caplog.text
    assert dns.asked(NAME, "A", "tcp") >= 1  # too big for UDP


# --- the balancing rules over discovered servers --------------------------------------------


def test_least_conn_over_discovered_servers(make_proxy, dns, make_pods):
    pods = make_pods(3)
    proxy = start(make_proxy, dns, pods, balance="least_conn")
    tunnels = [named_tunnel(proxy.address) for _ in range(2)]
    free = {p.host for p in pods} - {t.server for t in tunnels}
    assert len(free) == 1
    assert {served_by(proxy.address) for _ in range(4)} == free
    for tunnel in tunnels:
        tunnel.close()


def test_the_hash_ring_over_discovered_servers(make_proxy, dns, make_pods):
    pods = make_pods(4)
    proxy = start(make_proxy, dns, pods[:3], balance="hash", hash_key="header:x-user")
    users = [f"user{i}" for i in range(40)]

    def owners() -> dict[str, str]:
        return {u: served_by(proxy.address, extra=f"X-User: {u}\r\n".encode()) for u in users}

    before = owners()
    assert owners() == before
    assert len(set(before.values())) == 3
    dns.set(NAME, A=[p.host for p in pods])
    assert eventually(lambda: len(listed(proxy)) == 4)
    after = owners()
    moved = [u for u in users if after[u] != before[u]]
    assert moved, "the new server took no key"
    assert all(after[u] == pods[3].host for u in moved)
    assert len(moved) < len(users) / 2


def test_a_joining_address_ramps_up_with_slow_start(make_proxy, dns, make_pods):
    a, b, late = make_pods(3)
    proxy = start(make_proxy, dns, [a, b], slow_start="600s")
    # Servers of the first lookup serve at full weight from the start.
    assert [served_by(proxy.address) for _ in range(4)] == [a.host, b.host] * 2
    dns.set(NAME, A=[a.host, b.host, late.host])
    assert eventually(lambda: late.address in listed(proxy))
    hosts = [served_by(proxy.address) for _ in range(42)]
    assert 1 <= hosts.count(late.host) <= 4, hosts.count(late.host)  # ~1/21 of the traffic


def test_health_checks_probe_each_discovered_server(make_proxy, dns, make_pods):
    good, bad = make_pods(2)
    bad.health = "fail"
    check = {"path": "/healthz", "interval": "1s", "timeout": "1s", "unhealthy_after": 1}
    proxy = start(make_proxy, dns, [good, bad], health_check=check)

    def health() -> dict[str, bool]:
        return {s["address"]: s["healthy"] for s in page(proxy)["servers"]}

    assert eventually(lambda: health() == {good.address: True, bad.address: False})
    assert good.checks
    assert bad.checks
    assert {served_by(proxy.address) for _ in range(4)} == {good.host}
    labels = {"upstream": "app", "server": bad.address}
    assert value(scrape(admin(proxy)), "upgradeproxy_upstream_healthy", **labels) == 0


# --- what the operator sees -----------------------------------------------------------------


def test_upstreams_metrics_and_log_follow_the_set(make_proxy, dns, make_pods, caplog):
    caplog.set_level(logging.INFO, logger="upgradeproxy")
    a, b = make_pods(2)
    proxy = start(make_proxy, dns, [a, b])
    discovery = page(proxy)["discovery"]
    assert (discovery["name"], discovery["result"]) == (NAME, "ok")
    assert abs(discovery["time"] - time.time()) < 60
    tunnel = named_tunnel(proxy.address)
    dns.set(NAME, A=[a.host])
    assert eventually(lambda: listed(proxy) == [a.address])
    families = scrape(admin(proxy))
    assert value(families, "upgradeproxy_upstream_servers", upstream="app") == 1
    assert value(families, "upgradeproxy_discovery_lookups_total", result="ok") >= 2
    gone = {"upstream": "app", "server": b.address}
    healthy = "upgradeproxy_upstream_healthy"
    expect_gone = tunnel.server == b.host
    tunnel.close()
    if expect_gone:  # its tunnel series goes once the tunnel is closed, at the next lookup
        assert eventually(lambda: not _series(admin(proxy), "upgradeproxy_upstream_tunnels", gone))
    assert not _series(admin(proxy), healthy, gone)
    changes = [r for r in caplog.records if "servers changed" in r.getMessage()]
    assert [r.__dict__["removed"] for r in changes][-1] == [b.address]
    assert next(r.__dict__["added"] for r in changes) == [a.address, b.address]
    assert any(r.getMessage() == f"upstream app: {NAME}: 2 servers" for r in caplog.records)


def _series(port: int, name: str, labels: dict[str, str]) -> bool:
    families = scrape(port)
    return any(
        s.name == name and labels.items() <= s.labels.items()
        for f in families.values()
        for s in f.samples
    )


def test_a_lookup_is_never_more_frequent_than_the_interval(make_proxy, dns, make_pods):
    """A TTL of 1 s and an interval of 3 s: the name is asked once per 3 s, not per second."""
    pod = make_pods(1)[0]
    proxy = start(make_proxy, dns, [pod], interval="3s")
    assert dns.ttl == 1
    first = lookups(proxy, "ok")
    assert eventually(lambda: lookups(proxy, "ok") >= first + 2, timeout=15)
    asked = [q.at for q in dns.queries if q.name == NAME and q.rdtype == "A"]
    assert len(asked) >= 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(asked)]
    assert min(gaps) >= 2.5, gaps


def test_a_client_connection_made_before_a_change_follows_it(make_proxy, dns, make_pods):
    """A keep-alive connection keeps its config, but its balancer follows DNS like any."""
    a, b = make_pods(2)
    proxy = start(make_proxy, dns, [a])
    with socket.create_connection(proxy.address, timeout=10) as sock:
        assert _keepalive_get(sock) == a.host
        dns.set(NAME, A=[b.host])
        assert eventually(lambda: listed(proxy) == [b.address])
        assert _keepalive_get(sock) == b.host


def _keepalive_get(sock: socket.socket) -> str:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body, _ = read_response(sock)
    assert status == 200
    return body.decode()
