"""Load balancing (rule 8): smooth weighted round robin, refusing servers, least_conn's
in-flight counting, and servers that do not accept within `timeouts.connect`.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading

import pytest

from tests.conftest import (
    WAIT,
    WS_GUID,
    RawConn,
    assert_short_error,
    eventually,
    free_port,
    get,
    ok_response,
    raw_client,
    raw_tunnel,
    read_response,
    recv_exactly,
    values,
)

# --- rule 8: load balancing -------------------------------------------------------------------


def named_upstream(raw_upstream, name: bytes, hold: threading.Event | None = None):
    """Answers `name` with `Connection: close` (so every request is a fresh pick); a request
    for /hold waits for `hold` first."""
    heads: list[bytes] = []

    def handler(conn: RawConn) -> None:
        head = conn.read_head(timeout=WAIT)
        heads.append(head)
        if b"upgrade: websocket" in head.lower():
            key = values(head, b"sec-websocket-key")[0]
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            conn.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + name
            )
            conn.read_until_close(timeout=WAIT)
            return
        if head.startswith(b"GET /hold ") and hold is not None:
            hold.wait(WAIT)
        conn.send(ok_response(name, b"Connection: close\r\n"))
        conn.read_until_close(timeout=WAIT)

    up = raw_upstream(handler)
    up.heads_seen = heads
    return up


def balanced_yaml(servers: list[str], balance: str = "round_robin", timeouts: str = "") -> str:
    items = "\n".join(f"      - {s}" for s in servers)
    return f"""
listen:
  - address: "127.0.0.1:0"
upstreams:
  app:
    balance: {balance}
    servers:
{items}
routes:
  - upstream: app
timeouts: {{drain: 1{timeouts}}}
"""


def test_round_robin_5_1_1_is_smooth_and_repeats(make_proxy, raw_upstream):
    """Rule 8: "`round_robin` honours weights deterministically". README: "nginx's smooth
    weighted round robin ... (`5,1,1` gives `a a b a c a a`)". Three cycles of 7 picks."""
    ups = {n: named_upstream(raw_upstream, n) for n in (b"a", b"b", b"c")}
    servers = [
        f'{{address: "127.0.0.1:{ups[n].port}", weight: {w}}}'
        for n, w in ((b"a", 5), (b"b", 1), (b"c", 1))
    ]
    proxy = make_proxy(balanced_yaml(servers))
    picks = []
    for i in range(21):
        status, body = get(proxy.address, b"/%d" % i)
        assert status == 200
        picks.append(body)
    assert picks[:7] == [b"a", b"a", b"b", b"a", b"c", b"a", b"a"], picks
    assert picks[7:14] == picks[:7], picks
    assert picks[14:] == picks[:7], picks


def test_all_servers_refusing_is_502(make_proxy):
    """Rule 7: "upstream refused ... 502"; rule 8: each refusing server is skipped and the next
    one tried - when none is left the client gets a short 502, and keeps its connection."""
    proxy = make_proxy(balanced_yaml([f'"127.0.0.1:{free_port()}"' for _ in range(3)]))
    with raw_client(proxy.address) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, _ = read_response(sock)
            assert status == 502
            assert_short_error(body)


def test_refused_server_is_skipped_for_an_upgrade(make_proxy, raw_upstream):
    """Rule 8: "A server that refuses the connection is skipped and the next one tried (before
    any byte was sent)" - an upgrade too: the tunnel opens on the next server."""
    good = named_upstream(raw_upstream, b"good")
    proxy = make_proxy(balanced_yaml([f'"127.0.0.1:{free_port()}"', f'"127.0.0.1:{good.port}"']))
    for _ in range(2):
        sock, rest = raw_tunnel(proxy.address)
        with sock:
            assert recv_exactly(sock, 4, bytearray(rest)) == b"good"


def test_least_conn_counts_in_flight_requests(make_proxy, raw_upstream):
    """Rule 8: "`least_conn` counts open tunnels as well as in-flight requests": while one
    request is held on a server, every new request goes to the other one."""
    hold = threading.Event()
    a = named_upstream(raw_upstream, b"a", hold)
    b = named_upstream(raw_upstream, b"b", hold)
    proxy = make_proxy(
        balanced_yaml([f'"127.0.0.1:{a.port}"', f'"127.0.0.1:{b.port}"'], balance="least_conn")
    )
    held = raw_client(proxy.address, timeout=WAIT)
    try:
        held.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert eventually(lambda: len(a.heads_seen) + len(b.heads_seen) == 1)
        busy, other = (b"a", b"b") if a.heads_seen else (b"b", b"a")
        for i in range(4):
            assert get(proxy.address, b"/during/%d" % i) == (200, other), i
        hold.set()
        assert read_response(held)[2] == busy
    finally:
        hold.set()
        held.close()


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full, so a new connection is never accepted (SYNs are
    dropped): a connect to it times out instead of being refused."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(listener.getsockname())
        except OSError:
            s.close()
            break
        fillers.append(s)
    return listener, fillers


def test_server_not_accepting_within_connect_timeout_is_skipped(make_proxy, raw_upstream):
    """README rule 8: "A server that refuses the connection or does not accept it within
    `timeouts.connect` is skipped ... and the next one is tried"; README rule 7: with no
    server accepting within `timeouts.connect`, **504**."""
    hole, fillers = blackhole()
    try:
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(hole.getsockname())
            pytest.skip("cannot make a non-accepting listener on this kernel")
        except TimeoutError:
            pass
        finally:
            probe.close()
        good = named_upstream(raw_upstream, b"good")
        hole_addr = f'"127.0.0.1:{hole.getsockname()[1]}"'
        proxy = make_proxy(
            balanced_yaml([hole_addr, f'"127.0.0.1:{good.port}"'], timeouts=', connect: "300ms"')
        )
        for i in range(3):
            assert get(proxy.address, b"/%d" % i) == (200, b"good")
        alone = make_proxy(balanced_yaml([hole_addr], timeouts=', connect: "300ms"'))
        status, body = get(alone.address)
        assert status == 504
        assert_short_error(body)
    finally:
        for s in fillers:
            s.close()
        hole.close()
