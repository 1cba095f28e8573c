"""SIGTERM/SIGINT drain: /readyz turns 503, the listener stops accepting (after
`timeouts.drain_delay`), exchanges in flight finish, open tunnels get `timeouts.drain`, then
everything closes and the process exits 0; a second signal stops at once."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from tests.support.clients import (
    LOOPBACK,
    Tunnel,
    closed_by_peer,
    free_port,
    http,
    read_response,
    read_response_head,
    recv_exactly,
    refused,
)
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.peers import RawConn, echo, echo_after_switch, named, respond_ok_forever
from tests.support.waiting import WAIT, eventually
from tests.support.wire import WS_HEADERS, ok_response, switching


def test_drain_turns_readyz_503_stops_accepting_and_waits_for_tunnels(run_proxy, raw_upstream):
    """From the drain signal /readyz is 503 and the listener refuses; an open tunnel keeps
    working, and the process exits 0 as soon as it closes."""
    chat = raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    proc = run_proxy(config_yaml({"chat": chat.port}, [route("chat")], listen=[port], admin=admin))
    tunnel = Tunnel(port, tag=1)
    proc.signal(signal.SIGTERM)
    assert eventually(lambda: http(admin, "/readyz")[0] == 503)
    assert http(admin, "/healthz")[0] == 200
    assert eventually(lambda: refused(port))
    assert tunnel.echo(b"still open while draining") == b"still open while draining"
    tunnel.close()
    assert proc.wait_exit() == 0
    proc.wait_log("draining", signal="SIGTERM")


def test_drain_finishes_inflight_exchange_and_closes_idle_keepalive(run_proxy, raw_upstream):
    """An idle keep-alive connection is closed (once `timeouts.keepalive_drain` has passed); an
    exchange in flight gets its response, with `Connection: close`, then its connection
    closes; exit 0."""
    reached, release = threading.Event(), threading.Event()

    def slow(conn: RawConn) -> None:
        conn.read_head()
        reached.set()
        release.wait(WAIT)
        conn.send(ok_response(b"late"))

    fast, late = raw_upstream(respond_ok_forever), raw_upstream(slow)
    port = free_port()
    proc = run_proxy(
        config_yaml(
            {"fast": fast.port, "late": late.port},
            [route("late", path_prefix="/slow"), route("fast")],
            listen=[port],
        )
    )
    request = b"GET %s HTTP/1.1\r\nHost: svc.test\r\n\r\n"
    with (
        socket.create_connection((LOOPBACK, port), timeout=WAIT) as idle,
        socket.create_connection((LOOPBACK, port), timeout=WAIT) as busy,
    ):
        idle.sendall(request % b"/")
        assert read_response(idle)[0] == 200
        busy.sendall(request % b"/slow")
        assert reached.wait(WAIT)
        proc.signal(signal.SIGINT)
        proc.wait_log("draining", signal="SIGINT")
        assert idle.recv(1) == b""
        release.set()
        status, headers, body, _ = read_response(busy)
        assert (status, body, headers[b"connection"]) == (200, b"late", b"close")
        assert busy.recv(1) == b""
    assert proc.wait_exit() == 0


@pytest.mark.slow
def test_tunnel_is_cut_at_the_drain_deadline(run_proxy, raw_upstream):
    """A tunnel still open `timeouts.drain` after the signal is closed; exit 0 all the same."""
    chat = raw_upstream(echo_after_switch(b"A"))
    port = free_port()
    proc = run_proxy(
        config_yaml({"chat": chat.port}, [route("chat")], listen=[port], timeouts={"drain": 1})
    )
    tunnel = Tunnel(port, tag=1)
    signalled = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert tunnel.closed_by_peer()
    assert time.monotonic() - signalled >= 1.0  # the deadline, not the signal, closed it
    assert proc.wait_exit() == 0
    closed = proc.wait_log("tunnel")[0]
    assert closed["first_close"] == "cancelled"


def test_second_signal_stops_at_once(run_proxy, raw_upstream):
    chat = raw_upstream(echo_after_switch(b"A"))
    port = free_port()
    proc = run_proxy(
        config_yaml({"chat": chat.port}, [route("chat")], listen=[port], timeouts={"drain": 600})
    )
    tunnel = Tunnel(port, tag=1)
    proc.signal(signal.SIGTERM)
    proc.wait_log("draining")
    proc.signal(signal.SIGINT)
    assert proc.wait_exit() == 0  # well before the 600 s drain
    assert tunnel.closed_by_peer()
    proc.wait_log("stopping now", signal="SIGINT")


def test_drain_lets_an_upload_and_a_pending_upgrade_finish(run_proxy, tmp_path, raw_upstream):
    """SIGTERM/SIGINT drain gracefully (stop accepting, `/readyz` turns 503, in-flight HTTP
    exchanges finish, open tunnels get `timeouts.drain` seconds, then everything closes,
    exit 0). In flight at the signal: a request whose body is half sent, and an upgrade whose
    upstream has not answered yet. A SIGHUP during the drain changes nothing."""
    upgrade_seen, release = threading.Event(), threading.Event()

    def upstream(conn: RawConn) -> None:
        head = conn.read_head()
        if head.startswith(b"POST"):
            conn.send(ok_response(b"got " + conn.read_exactly(10, timeout=WAIT)))
            return
        upgrade_seen.set()
        release.wait(WAIT)
        conn.send(switching(head))  # the 101 only now, with the drain under way
        echo(conn)

    up, other = raw_upstream(upstream), raw_upstream(named(b"reloaded"))
    port, admin = free_port(), free_port()
    config = proxy_yaml(up.port, listen=port, admin=admin, timeouts={"drain": 2})
    proc = run_proxy(config)
    upload = socket.create_connection((LOOPBACK, port), timeout=WAIT)
    upgrade = socket.create_connection((LOOPBACK, port), timeout=WAIT)
    try:
        upload.sendall(b"POST /up HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 10\r\n\r\n12345")
        upgrade.sendall(b"GET /ws HTTP/1.1\r\nHost: svc.test\r\n" + WS_HEADERS + b"\r\n")
        assert upgrade_seen.wait(WAIT)
        assert eventually(lambda: sum(1 for c in up.conns if c.heads) == 2)

        proc.signal(signal.SIGTERM)
        proc.wait_log("draining")
        proc.rewrite(proxy_yaml(other.port, listen=port, admin=admin))
        proc.signal(signal.SIGHUP)
        upload.sendall(b"67890")
        status, headers, body, _ = read_response(upload)
        assert (status, body) == (200, b"got 1234567890")
        assert headers.get(b"connection") == b"close"
        release.set()
        head, buf = read_response_head(upgrade)
        assert head.startswith(b"HTTP/1.1 101 "), head
        upgrade.sendall(b"still here")
        assert recv_exactly(upgrade, 10, buf) == b"still here"
        assert http(admin, "/readyz")[0] == 503
        assert http(admin, "/healthz")[0] == 200
        assert http(admin, "/metrics")[0] == 200
        assert refused(port)
        assert closed_by_peer(upgrade)  # cut at the drain deadline
    finally:
        upload.close()
        upgrade.close()
    assert proc.wait_exit() == 0
    assert not [r for r in proc.records() if r.get("msg") == "reloaded"]
    assert [r["first_close"] for r in proc.access() if r.get("msg") == "tunnel"] == ["cancelled"]


def test_drain_delay_keeps_accepting_while_readyz_is_503(run_proxy, raw_upstream):
    """From SIGTERM /readyz is 503 at once, yet a new client is served until the delay ends;
    then the listener refuses, and the drain finishes as usual (exit 0)."""
    web = raw_upstream(respond_ok_forever)
    port, admin = free_port(), free_port()
    proc = run_proxy(
        config_yaml({"web": web.port}, [route("web")], listen=[port], admin=admin,
                    timeouts={"drain_delay": 3})
    )  # fmt: skip
    assert http(admin, "/readyz")[0] == 200
    proc.signal(signal.SIGTERM)
    assert eventually(lambda: http(admin, "/readyz")[0] == 503)
    status, _, body = http(port, "/during-the-delay")
    assert (status, body) == (200, b"ok")
    assert not refused(port)
    proc.wait_log("drain: accepting for drain_delay", seconds=3)
    assert eventually(lambda: refused(port), timeout=WAIT)
    assert proc.wait_exit() == 0
