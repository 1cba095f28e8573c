"""Rule 5: a FIN one way does not cut the other way, and a reset from either side closes both."""

from __future__ import annotations

import contextlib
import os
import queue
import socket

import pytest

from tests.support.clients import (
    raw_client,
    raw_tunnel,
    read_response_head,
    read_to_eof,
    read_until_close,
    recv_exactly,
    rst,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import RawConn, accept_upgrade
from tests.support.waiting import WAIT, eventually
from tests.support.wire import SWITCH_WS, status_of, ws_request


def test_client_half_close_keeps_the_way_back_open(make_proxy, raw_upstream):
    """Rule 5: "Half-closes are propagated (a FIN one way does not cut the other way)": after the
    client's FIN the upstream reads every byte then EOF, and its later reply still reaches the
    client, followed by EOF when the upstream closes."""
    payload = os.urandom(256 * 1024) + b"the end"
    reply = b"reply sent after your FIN"
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
            conn.send(reply)
        except BaseException as exc:
            at_upstream.put(exc)
        finally:
            conn.close()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    sock, rest = raw_tunnel(proxy.address)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert at_upstream.get(timeout=WAIT) == payload
        assert read_until_close(sock, rest) == reply


def test_upstream_half_close_keeps_the_way_up_open(make_proxy, raw_upstream):
    """Rule 5, the mirror case: after the upstream's FIN the client reads its bytes then EOF, yet
    what the client sends afterwards still reaches the upstream in full."""
    greeting = b"server says bye, but keeps listening"
    payload = os.urandom(256 * 1024) + b"the end"
    at_upstream: queue.Queue[bytes | BaseException] = queue.Queue()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            conn.send(greeting)
            conn.sock.shutdown(socket.SHUT_WR)
            at_upstream.put(conn.read_until_close(timeout=WAIT))
        except BaseException as exc:
            at_upstream.put(exc)
        finally:
            conn.close()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    sock, rest = raw_tunnel(proxy.address)
    with sock:
        assert read_until_close(sock, rest) == greeting
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert at_upstream.get(timeout=WAIT) == payload


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_reset_mid_tunnel_closes_the_other_side(make_proxy, raw_upstream, side):
    """Rule 5: both sockets close when the tunnel is done (README: "on a reset from either
    side"): after a reset (SO_LINGER 0) by one side mid-tunnel, the other side sees its
    connection closed within 5 s, and `upgradeproxy_tunnels_active` returns to 0."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    client = raw_client(proxy.address, timeout=WAIT)
    try:
        client.sendall(ws_request())
        conn = up.accept()
        conn.read_head()
        conn.send(SWITCH_WS)
        head, buf = read_response_head(client)
        assert status_of(head) == 101
        client.sendall(b"x" * 1000)
        assert conn.read_exactly(1000) == b"x" * 1000
        conn.send(b"y" * 1000)
        assert recv_exactly(client, 1000, buf) == b"y" * 1000
        assert eventually(lambda: proxy.tunnels_active() == 1)
        if side == "client":
            rst(client)
            data, closed = read_to_eof(conn.sock, 5)
        else:
            rst(conn.sock)
            data, closed = read_to_eof(client, 5)
        assert data == b""
        assert closed
    finally:
        with contextlib.suppress(OSError):
            client.close()
    assert eventually(lambda: proxy.tunnels_active() == 0)
