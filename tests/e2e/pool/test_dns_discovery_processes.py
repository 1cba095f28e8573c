"""Discovery across processes and signals (interface.md rule 16), with `upgradeproxy run`:
two replicas agree on sticky ids whatever order DNS gives the addresses in, a SIGHUP that keeps
`discover` keeps the set and its counts (one that changes it starts over), and a SIGUSR2
generation starts with a fresh lookup, or with the old generation's set if DNS fails it.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import eventually, free_port, start_proxy, write
from tests.e2e.pool.pods import NAME
from tests.e2e.pool_peers import Tunnel, admin_json, get, served_by

OTHER = "other.test"


def config(dns, pods, *, name: str = NAME, interval: str = "1s", keys: str = "",
           workers: int = 1, port: int = 0, admin: int = 0) -> str:  # fmt: skip
    upstream = "".join(f"\n    {line}" for line in keys.strip().splitlines())
    return f"""
listen: [{{address: "127.0.0.1:{port}"}}]
admin: {{address: "127.0.0.1:{admin}"}}
workers: {workers}
upstreams:
  app:
    discover: {{name: "{name}", port: {pods[0].port}, interval: "{interval}",
               resolvers: ["{dns.address}"]}}{upstream}
routes: [{{upstream: app}}]
timeouts: {{connect: 1, drain: 2}}
"""


class Running:
    """A proxy process on fixed ports, and what its /upstreams says."""

    def __init__(self, spawn, path, text: str, port: int, admin: int, workers: int = 1) -> None:
        self.path, self.port, self.admin = write(path, text), port, admin
        self.proc = start_proxy(spawn, self.path)
        self.reloads = 0
        if workers > 1:
            self.proc.wait_msg("worker ready", count=workers)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def listed(self) -> list[str]:
        return [server["address"] for server in admin_json(self.admin)["app"]["servers"]]

    def reload(self, text: str) -> None:
        write(self.path, text)
        self.proc.signal(signal.SIGHUP)
        self.reloads += 1
        self.proc.wait_msg("reloaded", count=self.reloads)


def run(spawn, tmp_path, dns, pods, name: str = "proxy.yaml", **kw) -> Running:
    port, admin = free_port(), free_port()
    text = config(dns, pods, port=port, admin=admin, **kw)
    return Running(spawn, tmp_path / name, text, port, admin, kw.get("workers", 1))


def test_two_replicas_agree_on_sticky_ids_whatever_order_dns_gives(spawn, tmp_path, dns, make_pods):
    pods = make_pods(3)
    dns.set(NAME, A=[p.host for p in pods])
    dns.default_mode = "shuffle"  # every answer lists the addresses in a new order
    one = run(spawn, tmp_path, dns, pods, "one.yaml", keys="sticky_cookie: upx")
    two = run(spawn, tmp_path, dns, pods, "two.yaml", keys="sticky_cookie: upx")
    cookies: dict[str, bytes] = {}
    for _ in range(3):
        status, headers, body = get(one.address)
        assert status == 200
        cookies[body.decode()] = headers[b"set-cookie"].split(b";")[0]
    assert set(cookies) == {p.host for p in pods}
    for host, cookie in cookies.items():
        assert served_by(two.address, extra=b"Cookie: " + cookie + b"\r\n") == host
    for _ in range(3):  # and the other replica names each pod with the same cookie
        status, headers, body = get(two.address)
        assert headers[b"set-cookie"].split(b";")[0] == cookies[body.decode()]


def test_sighup_that_keeps_discover_keeps_the_set_and_its_counts(spawn, tmp_path, dns, make_pods):
    pods = make_pods(2)
    dns.set(NAME, A=[p.host for p in pods])
    proxy = run(spawn, tmp_path, dns, pods)
    tunnel = Tunnel(proxy.address)
    # DNS goes silent: a reload that started over would find nothing.
    dns.mode[NAME] = "silent"
    text = config(dns, pods, keys="balance: least_conn", port=proxy.port, admin=proxy.admin)
    proxy.reload(text)
    assert proxy.listed() == [p.address for p in pods]
    servers = admin_json(proxy.admin)["app"]["servers"]
    assert {s["address"]: s["tunnels"] for s in servers}[f"{tunnel.server}:{pods[0].port}"] == 1
    assert admin_json(proxy.admin)["app"]["balance"] == "least_conn"
    # least_conn counts the tunnel opened before the reload: plain requests avoid its pod.
    assert {served_by(proxy.address) for _ in range(3)} == {p.host for p in pods} - {tunnel.server}
    assert tunnel.echo() == b"ping"
    tunnel.close()


def test_sighup_that_changes_discover_starts_over(spawn, tmp_path, dns, make_pods):
    a, b, c = make_pods(3)
    dns.set(NAME, A=[a.host, b.host])
    dns.set(OTHER, A=[c.host])
    proxy = run(spawn, tmp_path, dns, [a, b])
    proxy.reload(config(dns, [c], name=OTHER, port=proxy.port, admin=proxy.admin))
    # Looked up before the new config took traffic: no 503 in between.
    assert proxy.listed() == [c.address]
    assert admin_json(proxy.admin)["app"]["discovery"]["name"] == OTHER
    assert {served_by(proxy.address) for _ in range(3)} == {c.host}


def test_a_sigusr2_generation_starts_with_a_fresh_lookup(spawn, tmp_path, dns, make_pods):
    a, b, c = make_pods(3)
    dns.set(NAME, A=[a.host, b.host])
    # A long interval: the old generation will not see the change.
    proxy = run(spawn, tmp_path, dns, [a, b], interval="1h")
    dns.set(NAME, A=[a.host, b.host, c.host])
    proxy.proc.signal(signal.SIGUSR2)
    proxy.proc.wait_msg("upgrade: new process accepts; retiring")
    assert proxy.listed() == [a.address, b.address, c.address]
    assert c.host in {served_by(proxy.address) for _ in range(3)}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sigusr2_generation_keeps_the_set_when_dns_fails_it(
    spawn, tmp_path, dns, make_pods, workers
):
    pods = make_pods(2)
    dns.set(NAME, A=[p.host for p in pods])
    proxy = run(spawn, tmp_path, dns, pods, workers=workers)
    dns.mode[NAME] = "servfail"
    proxy.proc.signal(signal.SIGUSR2)
    if workers == 1:
        proxy.proc.wait_msg("upgrade: new process accepts; retiring")
    else:
        proxy.proc.wait_msg("upgrade: new generation ready, retiring the old one")
    proxy.proc.wait_msg("upstream app: starting from the 2 servers known before", count=workers)
    failed = [r for r in proxy.proc.records() if "first lookup of chat.test failed" in r["msg"]]
    assert len(failed) == workers
    assert proxy.listed() == [p.address for p in pods]
    assert {served_by(proxy.address) for _ in range(4)} == {p.host for p in pods}


def test_a_worker_that_starts_later_starts_from_its_groups_set(spawn, tmp_path, dns, make_pods):
    """workers: 2: the set each worker found is in a file their supervisor names; a worker
    that replaces one that died reads it before its first lookup."""
    pods = make_pods(2)
    dns.set(NAME, A=[p.host for p in pods])
    proxy = run(spawn, tmp_path, dns, pods, workers=2)
    dns.mode[NAME] = "silent"
    ready = proxy.proc.wait_msg("worker ready", count=2)
    os.kill(ready[0]["pid"], signal.SIGKILL)
    proxy.proc.wait_msg("worker ready", count=3)
    proxy.proc.wait_msg("upstream app: starting from the 2 servers known before")
    assert eventually(lambda: len({served_by(proxy.address) for _ in range(4)}) == 2)
