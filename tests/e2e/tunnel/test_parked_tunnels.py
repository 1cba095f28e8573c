"""Parked tunnels behave as running ones, exactly (contract rules 5, 8-11, 13, and the
Operations additions): an idle plain-TCP tunnel gives up its tasks to the process's waiter,
and everything the contract says of a tunnel is checked here against one that is parked.

Each test runs `upgradeproxy run` with `UPGRADEPROXY_PARK_AFTER` short, so a tunnel parks a
moment after its last byte; `upgradeproxy_tunnels_parked` on /metrics says when it has.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.clients import (
    LOOPBACK,
    Tunnel,
    closed_by_peer,
    free_port,
    http,
    raw_tunnel,
    recv_exactly,
    rst,
)
from tests.support.configs import proxy_yaml
from tests.support.metrics import scrape, value
from tests.support.peers import RawConn, accept_upgrade, echo_after_switch
from tests.support.processes import ProxyProcess, clean_env
from tests.support.waiting import eventually
from upgradeproxy.tunnel.parking import PARK_AFTER_ENV

PARK = "0.05"  # seconds: a tunnel parks between 50 and 100 ms after its last byte


@pytest.fixture
def start(run_proxy) -> Callable[..., ProxyProcess]:
    """`start(config_text)`: the proxy with a short park delay, once it listens."""
    return lambda text: run_proxy(text, env=clean_env(**{PARK_AFTER_ENV: PARK}))


def metric(admin: int, name: str, **labels: str) -> float:
    return value(scrape(admin), name, **labels)


def parked(admin: int, count: int) -> bool:
    """Eventually exactly `count` tunnels are parked."""
    return eventually(lambda: metric(admin, "upgradeproxy_tunnels_parked") == count)


def hold_after_switch(conn: RawConn) -> None:
    """An upstream that accepts the upgrade and leaves the connection to the test."""
    accept_upgrade(conn)


def tunnel_lines(proc: ProxyProcess, count: int = 1) -> list[dict[str, Any]]:
    return proc.wait_log("tunnel", count=count)


def config(servers: int | list[int], admin: int, *, upstream: dict | None = None, **keys) -> str:
    """One upstream (`upstream` its more keys) on `servers`, one route, an admin listener;
    `keys` top-level keys."""
    return proxy_yaml(servers, upstream=upstream, admin=admin, **keys)


# --- bytes, counts, log line (rules 5, 8, 11) ------------------------------------------


def test_a_parked_tunnel_relays_either_side_and_counts_every_byte(start, raw_upstream):
    """Rule 5 and the access log: bytes from either side of a parked tunnel arrive in order,
    unchanged (a message relayed by the waiter, a burst by the pumps it brings back); while
    parked it counts in tunnels_active and on its server; its log line has every byte."""
    up = raw_upstream(hold_after_switch)
    admin = free_port()
    proc = start(config(up.port, admin))
    client, _ = raw_tunnel(proc.port, "/chat")
    conn = up.accept()
    assert parked(admin, 1)
    families = scrape(admin)
    assert value(families, "upgradeproxy_tunnels_active") == 1
    assert value(families, "upgradeproxy_upstream_tunnels", server=f"{LOOPBACK}:{up.port}") == 1
    client.sendall(b"from the client, after a quiet spell")
    assert conn.read_exactly(36) == b"from the client, after a quiet spell"
    assert parked(admin, 1)  # still (or again) parked
    conn.send(b"x" * 70000)  # more than one read: the waiter relays some, the pumps the rest
    assert recv_exactly(client, 70000) == b"x" * 70000
    assert parked(admin, 1)
    conn.send(b"from the server")
    assert recv_exactly(client, 15) == b"from the server"
    assert parked(admin, 1)
    client.close()
    conn.sock.settimeout(10)
    assert conn.sock.recv(1) == b""  # the client's FIN
    conn.close()
    line = tunnel_lines(proc)[0]
    assert (line["first_close"], line["bytes_in"], line["bytes_out"]) == ("client", 36, 70015)
    assert (line["protocol"], line["status"]) == ("websocket", 101)
    assert metric(admin, "upgradeproxy_tunnels_active") == 0
    assert metric(admin, "upgradeproxy_tunnels_parked") == 0


@pytest.mark.parametrize("first", ["client", "upstream"])
def test_a_half_close_reaches_the_other_side_of_a_parked_tunnel(start, raw_upstream, first):
    """Rule 5: a FIN on a parked tunnel is passed on and the other way keeps flowing (parked
    again, half-closed), until the other side ends too."""
    up = raw_upstream(hold_after_switch)
    admin = free_port()
    proc = start(config(up.port, admin))
    client, _ = raw_tunnel(proc.port, "/chat")
    conn = up.accept()
    assert parked(admin, 1)
    ender, other = (client, conn.sock) if first == "client" else (conn.sock, client)
    ender.shutdown(socket.SHUT_WR)
    other.settimeout(10)
    assert other.recv(1) == b""  # the FIN went through
    assert parked(admin, 1)  # half-closed, parked again
    other.sendall(b"the other way still flows")
    assert recv_exactly(ender, 25) == b"the other way still flows"
    other.shutdown(socket.SHUT_WR)
    ender.settimeout(10)
    assert ender.recv(1) == b""
    line = tunnel_lines(proc)[0]
    assert line["first_close"] == first
    assert (line["bytes_in"], line["bytes_out"]) == ((25, 0) if first == "upstream" else (0, 25))
    assert parked(admin, 0)


@pytest.mark.parametrize("first", ["client", "upstream"])
def test_a_reset_closes_the_other_side_of_a_parked_tunnel(start, raw_upstream, first):
    """Rule 5: a reset on one side of a parked tunnel closes the other; the line says error."""
    up = raw_upstream(hold_after_switch)
    admin = free_port()
    proc = start(config(up.port, admin))
    client, _ = raw_tunnel(proc.port, "/chat")
    conn = up.accept()
    assert parked(admin, 1)
    ender, other = (client, conn.sock) if first == "client" else (conn.sock, client)
    rst(ender)
    assert closed_by_peer(other)
    line = tunnel_lines(proc)[0]
    assert line["first_close"] == "error"
    assert metric(admin, "upgradeproxy_tunnels_active") == 0


# --- timeouts (rules 5, 13) --------------------------------------------------------------


def test_tunnel_idle_closes_a_parked_tunnel(start, raw_upstream):
    """Rule 5: `tunnel_idle` with no bytes closes a parked tunnel; first_close idle."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, timeouts={"tunnel_idle": 0.5}))
    tunnel = Tunnel(proc.port, tag=1)
    assert parked(admin, 1)
    assert tunnel.closed_by_peer()
    line = tunnel_lines(proc)[0]
    assert line["first_close"] == "idle"
    assert line["duration"] >= 0.5


def test_tunnel_max_lifetime_closes_a_parked_tunnel(start, raw_upstream):
    """Rule 13: a parked tunnel is closed at its lifetime (0-10% late); first_close lifetime."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, timeouts={"tunnel_max_lifetime": 1}))
    tunnel = Tunnel(proc.port, tag=1)
    assert parked(admin, 1)
    assert tunnel.closed_by_peer()
    line = tunnel_lines(proc)[0]
    assert line["first_close"] == "lifetime"
    assert line["duration"] >= 1


# --- drain, SIGUSR2 (rule 13, Operations) --------------------------------------------------


def test_drain_wait_keeps_a_parked_tunnel_working_until_it_ends(start, raw_upstream):
    """drain_tunnels: wait: a parked tunnel stays open through the drain, wakes and relays;
    the process exits 0 once it closes."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, timeouts={"drain": 30}))
    tunnel = Tunnel(proc.port, tag=1)
    assert parked(admin, 1)
    proc.signal(signal.SIGTERM)
    proc.wait_log("draining", signal="SIGTERM")
    assert parked(admin, 1)
    assert tunnel.echo(b"still open while draining") == b"still open while draining"
    assert proc.alive()
    tunnel.close()
    assert proc.wait_exit() == 0
    assert tunnel_lines(proc)[0]["first_close"] == "client"


def test_the_drain_deadline_cuts_a_parked_tunnel(start, raw_upstream):
    """drain_tunnels: wait: a parked tunnel still open at `timeouts.drain` is closed."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, timeouts={"drain": 0.5}))
    tunnel = Tunnel(proc.port, tag=1)
    assert parked(admin, 1)
    proc.signal(signal.SIGTERM)
    assert tunnel.closed_by_peer()
    assert proc.wait_exit() == 0
    assert tunnel_lines(proc)[0]["first_close"] == "cancelled"


def test_drain_spread_closes_parked_tunnels_one_by_one(start, raw_upstream):
    """drain_tunnels: spread: parked tunnels close at times spread over the drain window,
    each with first_close drain, before the deadline."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, drain_tunnels="spread", timeouts={"drain": 1.5}))
    tunnels = [Tunnel(proc.port, tag=1) for _ in range(3)]
    assert parked(admin, 3)
    proc.signal(signal.SIGTERM)
    for tunnel in tunnels:
        assert tunnel.closed_by_peer()
    assert proc.wait_exit() == 0
    lines = tunnel_lines(proc, 3)
    assert [line["first_close"] for line in lines] == ["drain"] * 3
    ends = sorted(line["duration"] for line in lines)
    assert ends[0] < ends[1] < ends[2]


def test_sigusr2_leaves_parked_tunnels_with_the_old_process(start, raw_upstream):
    """SIGUSR2: the old process keeps its parked tunnel, which still relays, and exits once
    it closes; with upgrade_grace it would cut it then."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, timeouts={"upgrade_grace": 600}))
    old = proc.popen.pid
    tunnel = Tunnel(proc.port, tag=1)
    assert parked(admin, 1)
    proc.signal(signal.SIGUSR2)
    new = proc.wait_log("upgrade: new process accepts; retiring")[0]["new_pid"]
    assert new != old
    assert tunnel.echo(b"old process, parked tunnel") == b"old process, parked tunnel"
    assert proc.alive()
    tunnel.close()
    assert proc.wait_exit() == 0
    os.kill(new, signal.SIGTERM)


def test_upgrade_grace_cuts_a_parked_tunnel(start, raw_upstream):
    """SIGUSR2 with a short upgrade_grace: the old process closes its parked tunnel then."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, timeouts={"upgrade_grace": 0.5}))
    tunnel = Tunnel(proc.port, tag=1)
    assert parked(admin, 1)
    proc.signal(signal.SIGUSR2)
    new = proc.wait_log("upgrade: new process accepts; retiring")[0]["new_pid"]
    assert tunnel.closed_by_peer()
    assert proc.wait_exit() == 0
    assert tunnel_lines(proc)[0]["first_close"] == "cancelled"
    os.kill(new, signal.SIGTERM)


# --- balancing and limits (rules 8-11, 14) ---------------------------------------------------


def test_least_conn_counts_a_parked_tunnel(start, raw_upstream):
    """Rule 8: a parked tunnel still counts for least_conn: the next tunnel goes elsewhere."""
    a, b = raw_upstream(echo_after_switch(b"A")), raw_upstream(echo_after_switch(b"B"))
    admin = free_port()
    proc = start(config([a.port, b.port], admin, upstream={"balance": "least_conn"}))
    first = Tunnel(proc.port, tag=1)
    assert parked(admin, 1)
    second = Tunnel(proc.port, tag=1)
    assert {first.tag, second.tag} == {b"A", b"B"}


def test_max_tunnels_counts_a_parked_tunnel(start, raw_upstream):
    """Rules 9-11: a server at max_tunnels with a parked tunnel is full: a new upgrade gets 503
    at once; once the parked tunnel closes, the next one is let in."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, upstream={"max_tunnels": 1}))
    port = proc.port
    tunnel = Tunnel(port, tag=1)
    assert parked(admin, 1)
    upstreams = json.loads(http(admin, "/upstreams")[2])
    assert [s["tunnels"] for s in upstreams["app"]["servers"]] == [1]
    assert Tunnel(port).status == 503
    tunnel.close()
    assert eventually(lambda: metric(admin, "upgradeproxy_tunnels_active") == 0)
    assert Tunnel(port, tag=1).works()


def test_max_connections_per_ip_counts_a_parked_tunnel(start, raw_upstream):
    """Rule 14: a parked tunnel holds its client's count: a new connection gets 429 until it
    closes."""
    up = raw_upstream(echo_after_switch(b"A"))
    admin = free_port()
    proc = start(config(up.port, admin, limits={"max_connections_per_ip": 1}))
    port = proc.port
    tunnel = Tunnel(port, tag=1)
    assert parked(admin, 1)
    assert http(port, "/")[0] == 429
    tunnel.close()
    assert eventually(lambda: metric(admin, "upgradeproxy_tunnels_active") == 0)
    assert Tunnel(port, tag=1).works()
