"""Rule 13: `timeouts.tunnel_max_lifetime` closes a tunnel between its lifetime and 10% past
it; a drain closes tunnels at the end of the window, or spread over it with
`drain_tunnels: spread`."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from websockets.sync.client import connect

from tests.support.access_log import access_records
from tests.support.clients import (
    raw_client,
    read_response_head,
)
from tests.support.configs import proxy_yaml
from tests.support.waiting import WAIT, eventually
from tests.support.wire import ws_request

# The real clock: the proxy runs in its own thread, so wake-ups on a loaded 2-core machine can
# be late. A tunnel is never closed early (the jitter only adds), so the lower bound allows
# only the client thread's own wake-up lag after the 101 (10 ms); the upper bound, 1.1 s,
# gets LATE_MARGIN for the proxy's and the client's wake-ups after the close.
LATE_MARGIN = 0.4


def open_tunnel(proxy) -> tuple[socket.socket, float]:
    """A raw WebSocket tunnel through `proxy` and the moment its 101 arrived."""
    sock = raw_client(proxy.address, timeout=WAIT)
    sock.sendall(ws_request(target=b"/", host=b"chat.example.com"))
    head, rest = read_response_head(sock)
    switched = time.monotonic()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert not rest
    return sock, switched


def closed_at(sock: socket.socket) -> float:
    """Read until the proxy closes `sock`; when it did."""
    while sock.recv(65536):
        pass
    return time.monotonic()


def test_tunnel_lifetime_closes_between_1_0_and_1_1_s(make_proxy, ws_upstream, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"tunnel_max_lifetime": 1}))
    tunnels = [open_tunnel(proxy) for _ in range(3)]
    for sock, switched in tunnels:
        with sock:
            sock.settimeout(WAIT)
            lived = closed_at(sock) - switched
            assert 1.0 - 0.01 <= lived <= 1.1 + LATE_MARGIN, lived
    assert eventually(lambda: len(access_records(caplog, "tunnel")) == 3)
    assert {r["first_close"] for r in access_records(caplog, "tunnel")} == {"lifetime"}


def test_without_lifetime_a_tunnel_stays_open(make_proxy, ws_upstream):
    """`tunnel_max_lifetime: 0` is no limit: a tunnel outlives one opened after it through a
    proxy with a 1 s lifetime (whose close is the sentinel: a second has passed)."""
    up = ws_upstream()
    forever = make_proxy(proxy_yaml(up.port, timeouts={"tunnel_max_lifetime": 0}))
    limited = make_proxy(proxy_yaml(up.port, timeouts={"tunnel_max_lifetime": 1}))
    with connect(forever.url("/"), open_timeout=WAIT) as ws:
        sentinel, _ = open_tunnel(limited)
        with sentinel:
            closed_at(sentinel)
        ws.send("still here")
        assert ws.recv(timeout=WAIT) == "still here"


def close_times(socks: list[socket.socket], since: float, limit: float) -> list[float]:
    """Seconds after `since` at which the proxy closed each socket (watched with select)."""
    import selectors

    found: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        while len(found) < len(socks) and time.monotonic() - since < limit:
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    found[sock] = time.monotonic() - since
                    sel.unregister(sock)
    assert len(found) == len(socks), f"{len(socks) - len(found)} tunnels still open"
    return sorted(found.values())


@pytest.mark.slow
def test_spread_drain_closes_tunnels_across_the_window(make_proxy, ws_upstream, caplog):
    """12 tunnels, `drain: 4`: they close a few at a time over the 4 s, not in one burst."""
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"drain": 4}, drain_tunnels="spread"))
    socks = [open_tunnel(proxy)[0] for _ in range(12)]
    started = time.monotonic()
    proxy.drain()
    times = close_times(socks, started, 4 + LATE_MARGIN + 1)
    for sock in socks:
        sock.close()
    assert len({int(t) for t in times}) >= 3, times  # at least 3 distinct 1-second buckets
    assert times[-1] - times[0] >= 2.5, times  # evenly over 4 s: the ends are 3.67 s apart
    assert times[-1] <= 4 + LATE_MARGIN, times
    assert eventually(lambda: len(access_records(caplog, "tunnel")) == 12)
    assert {r["first_close"] for r in access_records(caplog, "tunnel")} == {"drain"}


def test_wait_drain_keeps_tunnels_until_the_window_ends(make_proxy, ws_upstream):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts={"drain": 1}))
    socks = [open_tunnel(proxy)[0] for _ in range(4)]
    started = time.monotonic()
    proxy.drain()
    times = close_times(socks, started, 1 + LATE_MARGIN + 1)
    for sock in socks:
        sock.close()
    assert times[0] >= 1.0 - 0.01, times  # none before the drain window ends
