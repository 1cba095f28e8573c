"""Rule 5: a tunnel closes when `tunnel_idle` passes with no bytes either way, and only then;
an open tunnel holds no HTTP state."""

from __future__ import annotations

import gc
import queue
import threading

import h11
import pytest

from tests.support.clients import (
    Tunnel,
    raw_client,
    raw_tunnel,
    readable,
    recv_exactly,
    ws_upgrade,
)
from tests.support.configs import proxy_yaml
from tests.support.peers import RawConn, accept_upgrade, echo_after_switch
from tests.support.waiting import WAIT, eventually
from upgradeproxy.connection.context import Client


def test_idle_tunnel_is_closed_on_both_sides(make_proxy, raw_upstream):
    """Rule 5: "when ... `tunnel_idle` passes with no bytes, both sockets close"."""
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
        except BaseException as exc:
            at_upstream.put(exc)

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port, timeouts={"tunnel_idle": "300ms"}))
    sock, rest = raw_tunnel(proxy.address)
    with sock:
        assert rest == b""
        assert sock.recv(65536) == b"", "the proxy should close the idle client side"
    assert at_upstream.get(timeout=WAIT) == b"", "the proxy should close the idle upstream side"
    assert eventually(lambda: proxy.telemetry.tunnels_active == 0)


@pytest.mark.parametrize("traffic", ["echo", "client-only", "upstream-only"])
def test_tunnel_with_traffic_stays_open_past_idle_timeout(make_proxy, raw_upstream, traffic):
    """Rule 5: the tunnel closes only when `tunnel_idle` passes "with no bytes either way":
    bytes flowing in either or both directions keep it open. Until when: a quiet tunnel
    opened just after it (the sentinel) has been closed for being idle."""
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()
    stop = threading.Event()  # upstream-only: stop sending

    def handler(conn: RawConn) -> None:
        try:
            head = accept_upgrade(conn)
            if head.startswith(b"GET /quiet "):
                at_upstream.put(conn.read_until_close(timeout=WAIT))
                return
            if traffic == "echo":
                while (byte := conn.read_exactly(1, timeout=WAIT)) != b"!":
                    conn.send(byte)
            elif traffic == "client-only":
                got = bytearray()
                while (byte := conn.read_exactly(1, timeout=WAIT)) != b"!":
                    got += byte
                at_upstream.put(bytes(got))
            else:
                while not stop.is_set():
                    conn.send(b"d")
            conn.send(b"still here")
            at_upstream.put(conn.read_exactly(4, timeout=WAIT))
        except BaseException as exc:
            at_upstream.put(exc)

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port, timeouts={"tunnel_idle": 1}))
    busy = Tunnel(proxy.address, "/busy")
    quiet = Tunnel(proxy.address, "/quiet")
    sent = 0
    with busy.sock as sock, quiet.sock:
        while not readable(quiet.sock):  # bytes flow until the quiet tunnel is closed
            if traffic == "echo":
                assert busy.echo(b"u") == b"u"
            elif traffic == "client-only":
                sock.sendall(b"u")
                sent += 1
            else:
                assert busy.recv(1) == b"d"
        assert at_upstream.get(timeout=WAIT) == b""  # the quiet one, closed both ways
        if traffic != "upstream-only":
            sock.sendall(b"!")
        if traffic == "client-only":
            assert at_upstream.get(timeout=WAIT) == b"u" * sent
        stop.set()
        assert busy.recv_until(b"still here").strip(b"d") == b""
        sock.sendall(b"ack!")
        assert at_upstream.get(timeout=WAIT) == b"ack!"


def _live(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


def test_an_open_tunnel_holds_no_h11_connection_and_no_client_context(make_proxy, raw_upstream):
    up = raw_upstream(echo_after_switch())
    proxy = make_proxy(proxy_yaml(up.port, limits={"max_connections_per_ip": 5}))
    before = (_live(h11.Connection), _live(Client))
    with raw_client(proxy.address) as sock:
        ws_upgrade(sock)
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"  # the tunnel runs
        assert (_live(h11.Connection), _live(Client)) == before
