"""Tunnels end to end (rule 5): bytes in order under ping-pong and a hundred concurrent
tunnels, a reset on either side closes the other, a slow reader holds back the writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.clients import (
    Tunnel,
    raw_client,
    read_response_head,
    read_to_eof,
    recv_exactly,
    rst,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import RawConn, accept_upgrade
from tests.support.waiting import WAIT, eventually, steady
from tests.support.wire import SWITCH_WS, status_of, ws_request

# --- rule 5: tunnels ---------------------------------------------------------------------------


def test_one_byte_ping_pong_2000_times(make_proxy, raw_upstream):
    """Rule 5: "Bytes are never reordered, duplicated or dropped" - 2,000 one-byte round trips,
    each answered by the upstream with the next byte value."""
    rounds = 2000

    def handler(conn: RawConn) -> None:
        accept_upgrade(conn)
        for _ in range(rounds):
            b = conn.read_exactly(1, timeout=WAIT)
            conn.send(bytes([(b[0] + 1) % 256]))

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    tunnel = Tunnel(proxy.address)
    assert tunnel.buf == b""
    with tunnel.sock as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(rounds):
            sock.sendall(bytes([i % 256]))
            assert sock.recv(1) == bytes([(i + 1) % 256]), i


def test_hundred_concurrent_tunnels_with_checksums(make_proxy, raw_upstream):
    """Rule 5: "Bytes are never reordered, duplicated or dropped", across 100 tunnels at once,
    each moving 200 KiB up and 200 KiB down (seeded per tunnel), checked by sha256."""
    n, size = 100, 200 * 1024
    up_hashes: dict[bytes, str] = {}
    errors: list[BaseException] = []

    def payload(tag: bytes, direction: bytes) -> bytes:
        seed = hashlib.sha256(tag + direction).digest()
        return (seed * (size // len(seed) + 1))[:size]

    def handler(conn: RawConn) -> None:
        try:
            head = accept_upgrade(conn)
            tag = head.split(b" ")[1]
            threading.Thread(
                target=lambda: (
                    conn.sock.sendall(payload(tag, b"down")),
                    conn.sock.shutdown(socket.SHUT_WR),
                ),
                daemon=True,
            ).start()
            got = bytes(conn.received) + conn.read_until_close(timeout=WAIT * 2)
            up_hashes[tag] = hashlib.sha256(got).hexdigest()
        except BaseException as exc:
            errors.append(exc)

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))

    def client(i: int) -> bool:
        tag = b"/t%d" % i
        tunnel = Tunnel(proxy.address, tag.decode())
        rest = tunnel.buf
        with tunnel.sock as sock:
            sock.settimeout(WAIT * 2)
            writer = threading.Thread(
                target=lambda: (sock.sendall(payload(tag, b"up")), sock.shutdown(socket.SHUT_WR)),
                daemon=True,
            )
            writer.start()
            got = bytearray(rest)
            while data := sock.recv(65536):
                got += data
            writer.join(WAIT)
        return bytes(got) == payload(tag, b"down")

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(client, range(n), timeout=WAIT * 4))
    assert all(results), results.count(False)
    assert eventually(lambda: len(up_hashes) == n, WAIT), (len(up_hashes), errors)
    assert not errors, errors
    for i in range(n):
        tag = b"/t%d" % i
        assert up_hashes[tag] == hashlib.sha256(payload(tag, b"up")).hexdigest(), tag
    assert eventually(lambda: proxy.tunnels_active() == 0)


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


def test_slow_reader_holds_back_the_writer_end_to_end(make_proxy, raw_upstream):
    """Rule 5: "Back-pressure holds: a slow reader slows the writer, memory per tunnel stays
    bounded." The upstream tries to push 96 MiB at a client that does not read: its writes
    stall with far less than that accepted (only socket buffers and one pipe in between), and
    once the client reads, every byte arrives in order."""
    total, piece = 96 << 20, 64 << 10
    chunk = hashlib.sha256(b"bp").digest() * (piece // 32)
    written = [0]
    done = threading.Event()

    def handler(conn: RawConn) -> None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        accept_upgrade(conn)
        conn.sock.settimeout(30)
        try:
            while written[0] < total:
                conn.sock.sendall(chunk)
                written[0] += piece
            conn.sock.shutdown(socket.SHUT_WR)
        finally:
            done.set()

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(WAIT)
    sock.connect(proxy.address)
    with sock:
        sock.sendall(ws_request())
        head, buf = read_response_head(sock)
        assert status_of(head) == 101
        # The writer stops making progress (or finishes, which fails below): how far it got.
        stalled_at = steady(lambda: written[0])
        assert not done.is_set(), "the upstream wrote 96 MiB to a client that never read"
        assert stalled_at < 64 << 20, stalled_at
        got, sha = len(buf), hashlib.sha256(bytes(buf))
        while data := sock.recv(1 << 18):
            got += len(data)
            sha.update(data)
    expected = hashlib.sha256()
    for _ in range(total // piece):
        expected.update(chunk)
    assert got == total
    assert sha.digest() == expected.digest()
