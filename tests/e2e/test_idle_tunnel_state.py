"""An open tunnel keeps only what it needs: the HTTP state that produced it (h11 on both legs,
the client's context) is released before the bytes flow, so idle tunnels stay small."""

from __future__ import annotations

import gc

import h11

from tests.support.clients import raw_client, recv_exactly, ws_upgrade
from tests.support.configs import proxy_yaml
from tests.support.peers import echo_after_switch
from upgradeproxy.connection.context import Client


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
