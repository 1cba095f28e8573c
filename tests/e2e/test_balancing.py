"""Rule 8: load balancing over real upstream sockets.

A refusing server is skipped, round_robin honours weights deterministically, and least_conn
counts open tunnels as well as in-flight requests.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time

from tests.conftest import (
    WS_GUID,
    RawConn,
    RawUpstream,
    free_port,
    get,
    ok_response,
    raw_client,
    read_response_head,
)


def upstream_yaml(servers: str, balance: str) -> str:
    return f"""
listen:
  - address: "127.0.0.1:0"
upstreams:
  app:
    balance: {balance}
    servers:
{servers}
routes:
  - upstream: app
timeouts: {{drain: 1}}
"""


class Named:
    """A raw upstream that answers with its own name and `Connection: close`.

    `Connection: close` keeps the proxy from pooling, so every request is a fresh pick.
    It waits for the proxy to close its side, and counts that, so a test can know the
    proxy has finished with an exchange (and released the server) before the next one.
    """

    def __init__(self, raw_upstream, name: bytes) -> None:
        self.name = name
        self.heads: list[bytes] = []
        self.closed = 0
        self._cond = threading.Condition()
        self.up: RawUpstream = raw_upstream(self._handle)

    def _handle(self, conn: RawConn) -> None:
        try:
            head = conn.read_head(timeout=30)
            with self._cond:
                self.heads.append(head)
            if b"\r\nupgrade: websocket" in head.lower():
                self._tunnel(conn, head)
                return
            conn.send(ok_response(self.name, b"Connection: close\r\n"))
            conn.read_until_close(timeout=30)
        finally:
            conn.close()
            with self._cond:
                self.closed += 1
                self._cond.notify_all()

    @staticmethod
    def _tunnel(conn: RawConn, head: bytes) -> None:
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        conn.sock.settimeout(30)
        while data := conn.sock.recv(65536):  # echo until the client's FIN arrives
            conn.send(data)

    def wait_closed(self, n: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.closed < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{self.name!r}: proxy did not finish exchange {n}"
                self._cond.wait(left)

    @property
    def port(self) -> int:
        return self.up.port


def test_refused_server_is_skipped(make_proxy, raw_upstream):
    good = Named(raw_upstream, b"good")
    dead = free_port()
    servers = f'      - "127.0.0.1:{dead}"\n      - "127.0.0.1:{good.port}"'
    proxy = make_proxy(upstream_yaml(servers, "round_robin"))
    for i in range(4):
        assert get(proxy.address, b"/%d" % i) == (200, b"good")
    assert len(good.heads) == 4


def test_refused_server_is_skipped_least_conn(make_proxy, raw_upstream):
    good = Named(raw_upstream, b"good")
    dead = free_port()
    servers = f'      - "127.0.0.1:{dead}"\n      - "127.0.0.1:{good.port}"'
    proxy = make_proxy(upstream_yaml(servers, "least_conn"))
    for i in range(3):
        assert get(proxy.address, b"/%d" % i) == (200, b"good")


def test_round_robin_weights_3_to_1(make_proxy, raw_upstream):
    a = Named(raw_upstream, b"a")
    b = Named(raw_upstream, b"b")
    servers = (
        f'      - {{address: "127.0.0.1:{a.port}", weight: 3}}\n'
        f'      - {{address: "127.0.0.1:{b.port}", weight: 1}}'
    )
    proxy = make_proxy(upstream_yaml(servers, "round_robin"))
    picks = []
    for i in range(8):
        status, body = get(proxy.address, b"/%d" % i)
        assert status == 200
        picks.append(body)
    assert picks.count(b"a") == 6, picks
    assert picks.count(b"b") == 2, picks
    # Deterministic: every cycle of 4 holds exactly one pick of b.
    assert picks[:4].count(b"b") == 1, picks
    assert picks[4:] == picks[:4], picks


def _ws_handshake() -> bytes:
    key = base64.b64encode(b"0123456789abcdef")
    return (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def test_least_conn_counts_open_tunnels(make_proxy, raw_upstream):
    a = Named(raw_upstream, b"a")
    b = Named(raw_upstream, b"b")
    servers = f'      - "127.0.0.1:{a.port}"\n      - "127.0.0.1:{b.port}"'
    proxy = make_proxy(upstream_yaml(servers, "least_conn"))
    by_name = {b"a": a, b"b": b}

    tunnel = raw_client(proxy.address)
    try:
        tunnel.sendall(_ws_handshake())
        head, rest = read_response_head(tunnel)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert not rest
        tunnel.sendall(b"ping")
        assert tunnel.recv(4) == b"ping"  # the tunnel is open
        held = a if a.heads else b
        other = b if held is a else a
        assert len(held.heads) == 1
        assert other.heads == []

        # While the tunnel is open its server carries 1, the other 0: every request goes there.
        for i in range(4):
            status, body = get(proxy.address, b"/during/%d" % i)
            assert (status, body) == (200, other.name), i
            other.wait_closed(i + 1)  # the proxy is done with this request
        assert len(held.heads) == 1
    finally:
        tunnel.close()

    # Both halves close: the tunnel ends and its server is released.
    held.wait_closed(1)
    deadline = time.monotonic() + 5
    while proxy.call(lambda: proxy.telemetry.tunnels_active):
        assert time.monotonic() < deadline, "tunnel never closed"
        time.sleep(0.01)

    picks = []
    for i in range(4):
        status, body = get(proxy.address, b"/after/%d" % i)
        assert status == 200
        picks.append(body)
        by_name[body].wait_closed(len(by_name[body].heads))
    assert b"a" in picks
    assert b"b" in picks, picks
