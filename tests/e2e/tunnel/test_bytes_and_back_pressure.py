"""Rule 5: bytes are never reordered, duplicated or dropped (a one-byte ping-pong, a hundred
tunnels at once, 32 MiB each way), and back-pressure holds: a slow reader slows the writer."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from tests.support.clients import (
    Tunnel,
    raw_tunnel,
    read_response_head,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import RawConn, accept_upgrade
from tests.support.waiting import WAIT, eventually, steady
from tests.support.wire import status_of, ws_request


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


MiB = 1 << 20


class HashingReader:
    """Reads a socket to EOF, keeping only a running sha256 and a byte count."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.sha.update(data)
        self.total += len(data)

    def read_to_eof(self, sock: socket.socket) -> None:
        while data := sock.recv(1 << 18):
            self.feed(data)


def send_then_fin(sock: socket.socket, payload: bytes, errors: list[BaseException]) -> None:
    """Write `payload` in 1 MiB slices, then half-close; errors are collected, not lost."""
    try:
        view = memoryview(payload)
        for i in range(0, len(view), MiB):
            sock.sendall(view[i : i + MiB])
        sock.shutdown(socket.SHUT_WR)
    except BaseException as exc:
        errors.append(exc)


def test_32_mib_each_way_at_once_through_raw_tunnel(make_proxy, raw_upstream):
    """Rule 5: "Bytes are never reordered, duplicated or dropped", with both directions busy at
    once: 32 MiB up and 32 MiB down concurrently, checked by exact count and sha256 on arrival,
    each side ending with a FIN."""
    size = 32 * MiB
    up_payload, down_payload = os.urandom(size), os.urandom(size)
    at_upstream = HashingReader()
    upstream_errors: list[BaseException] = []
    upstream_done = threading.Event()

    def handler(conn: RawConn) -> None:
        try:
            accept_upgrade(conn)
            writer = threading.Thread(
                target=send_then_fin, args=(conn.sock, down_payload, upstream_errors)
            )
            writer.start()
            at_upstream.feed(bytes(conn.received))
            conn.received.clear()
            at_upstream.read_to_eof(conn.sock)
            writer.join(WAIT * 3)
        except BaseException as exc:
            upstream_errors.append(exc)
        finally:
            upstream_done.set()

    upstream = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(upstream.port))
    sock, rest = raw_tunnel(proxy.address)
    client_errors: list[BaseException] = []
    writer = threading.Thread(target=send_then_fin, args=(sock, up_payload, client_errors))
    writer.start()
    at_client = HashingReader()
    at_client.feed(rest)
    try:
        at_client.read_to_eof(sock)
    finally:
        writer.join(WAIT * 3)
        sock.close()
    assert upstream_done.wait(WAIT * 3)
    assert not client_errors, client_errors
    assert not upstream_errors, upstream_errors
    assert at_upstream.total == size
    assert at_client.total == size
    assert at_upstream.sha.digest() == hashlib.sha256(up_payload).digest()
    assert at_client.sha.digest() == hashlib.sha256(down_payload).digest()
