"""Discovery across processes and signals (interface.md rule 16), with `upgradeproxy run`:
two replicas agree on sticky ids whatever order DNS gives the addresses in, a SIGHUP that keeps
`discover` keeps the set and its counts (one that changes it starts over), and a SIGUSR2
generation starts with a fresh lookup, or with the old generation's set if DNS fails it.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.clients import free_port, http
from tests.support.metrics import admin_json
from tests.support.peers import named_tunnel, served_by
from tests.support.pods import NAME, discover_yaml
from tests.support.waiting import eventually

OTHER = "other.test"


def config(dns, pods, *, workers: int = 1, port: int = 0, admin: int = 0, **keys) -> str:
    return discover_yaml(dns, pods[0].port, listen=port, admin=admin, top={"workers": workers},
                         **keys)  # fmt: skip


class Running:
    """A proxy process on fixed ports, and what its /upstreams says."""

    def __init__(self, run_proxy, text: str, port: int, admin: int, workers: int = 1) -> None:
        self.port, self.admin = port, admin
        self.proc = run_proxy(text, workers=workers)
        self.reloads = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def listed(self) -> list[str]:
        return [server["address"] for server in admin_json(self.admin)["app"]["servers"]]

    def reload(self, text: str) -> None:
        self.proc.rewrite(text)
        self.proc.signal(signal.SIGHUP)
        self.reloads += 1
        self.proc.wait_log("reloaded", count=self.reloads)


def run(run_proxy, dns, pods, **kw) -> Running:
    port, admin = free_port(), free_port()
    text = config(dns, pods, port=port, admin=admin, **kw)
    return Running(run_proxy, text, port, admin, kw.get("workers", 1))


def test_two_replicas_agree_on_sticky_ids_whatever_order_dns_gives(run_proxy, dns, make_pods):
    pods = make_pods(3)
    dns.set(NAME, A=[p.host for p in pods])
    dns.default_mode = "shuffle"  # every answer lists the addresses in a new order
    one = run(run_proxy, dns, pods, sticky_cookie="upx")
    two = run(run_proxy, dns, pods, sticky_cookie="upx")
    cookies: dict[str, bytes] = {}
    for _ in range(3):
        status, headers, body = http(one.address)
        assert status == 200
        cookies[body.decode()] = headers[b"set-cookie"].split(b";")[0]
    assert set(cookies) == {p.host for p in pods}
    for host, cookie in cookies.items():
        assert served_by(two.address, extra=b"Cookie: " + cookie + b"\r\n") == host
    for _ in range(3):  # and the other replica names each pod with the same cookie
        status, headers, body = http(two.address)
        assert headers[b"set-cookie"].split(b";")[0] == cookies[body.decode()]


def test_sighup_that_keeps_discover_keeps_the_set_and_its_counts(run_proxy, dns, make_pods):
    pods = make_pods(2)
    dns.set(NAME, A=[p.host for p in pods])
    proxy = run(run_proxy, dns, pods)
    tunnel = named_tunnel(proxy.address)
    # DNS goes silent: a reload that started over would find nothing.
    dns.mode[NAME] = "silent"
    text = config(dns, pods, balance="least_conn", port=proxy.port, admin=proxy.admin)
    proxy.reload(text)
    assert proxy.listed() == [p.address for p in pods]
    servers = admin_json(proxy.admin)["app"]["servers"]
    assert {s["address"]: s["tunnels"] for s in servers}[f"{tunnel.server}:{pods[0].port}"] == 1
    assert admin_json(proxy.admin)["app"]["balance"] == "least_conn"
    # least_conn counts the tunnel opened before the reload: plain requests avoid its pod.
    assert {served_by(proxy.address) for _ in range(3)} == {p.host for p in pods} - {tunnel.server}
    assert tunnel.echo() == b"ping"
    tunnel.close()


def test_sighup_that_changes_discover_starts_over(run_proxy, dns, make_pods):
    a, b, c = make_pods(3)
    dns.set(NAME, A=[a.host, b.host])
    dns.set(OTHER, A=[c.host])
    proxy = run(run_proxy, dns, [a, b])
    proxy.reload(config(dns, [c], name=OTHER, port=proxy.port, admin=proxy.admin))
    # Looked up before the new config took traffic: no 503 in between.
    assert proxy.listed() == [c.address]
    assert admin_json(proxy.admin)["app"]["discovery"]["name"] == OTHER
    assert {served_by(proxy.address) for _ in range(3)} == {c.host}


def test_a_sigusr2_generation_starts_with_a_fresh_lookup(run_proxy, dns, make_pods):
    a, b, c = make_pods(3)
    dns.set(NAME, A=[a.host, b.host])
    # A long interval: the old generation will not see the change.
    proxy = run(run_proxy, dns, [a, b], interval="1h")
    dns.set(NAME, A=[a.host, b.host, c.host])
    proxy.proc.signal(signal.SIGUSR2)
    proxy.proc.wait_log("upgrade: new process accepts; retiring")
    assert proxy.listed() == [a.address, b.address, c.address]
    assert c.host in {served_by(proxy.address) for _ in range(3)}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sigusr2_generation_keeps_the_set_when_dns_fails_it(
    run_proxy, dns, make_pods, workers
):
    pods = make_pods(2)
    dns.set(NAME, A=[p.host for p in pods])
    proxy = run(run_proxy, dns, pods, workers=workers)
    dns.mode[NAME] = "servfail"
    proxy.proc.signal(signal.SIGUSR2)
    if workers == 1:
        proxy.proc.wait_log("upgrade: new process accepts; retiring")
    else:
        proxy.proc.wait_log("upgrade: new generation ready, retiring the old one")
    proxy.proc.wait_log("upstream app: starting from the 2 servers known before", count=workers)
    failed = [r for r in proxy.proc.records() if "first lookup of chat.test failed" in r["msg"]]
    assert len(failed) == workers
    assert proxy.listed() == [p.address for p in pods]
    assert {served_by(proxy.address) for _ in range(4)} == {p.host for p in pods}


def test_a_worker_that_starts_later_starts_from_its_groups_set(run_proxy, dns, make_pods):
    """workers: 2: the set each worker found is in a file their supervisor names; a worker
    that replaces one that died reads it before its first lookup."""
    pods = make_pods(2)
    dns.set(NAME, A=[p.host for p in pods])
    proxy = run(run_proxy, dns, pods, workers=2)
    dns.mode[NAME] = "silent"
    ready = proxy.proc.wait_log("worker ready", count=2)
    os.kill(ready[0]["pid"], signal.SIGKILL)
    proxy.proc.wait_log("worker ready", count=3)
    proxy.proc.wait_log("upstream app: starting from the 2 servers known before")
    assert eventually(lambda: len({served_by(proxy.address) for _ in range(4)}) == 2)
