"""Faults from outside: no descriptors left, upstreams that stall or never end a head,
a flood of silent clients. The proxy runs as a real `upgradeproxy run` subprocess so its
memory, descriptors and CPU time can be read from /proc."""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Callable

import pytest

from tests.support.clients import (
    LOOPBACK,
    read_response,
    read_response_head,
    recv_exactly,
)
from tests.support.configs import proxy_yaml
from tests.support.peers import RawConn, echo_after_switch, respond_ok_forever
from tests.support.processes import ProxyProcess
from tests.support.waiting import eventually
from tests.support.wire import ws_request

MB = 1 << 20
HANDSHAKE = ws_request(target=b"/ws", host=b"t")
ws_echo = echo_after_switch()  # a valid 101, then every byte echoed until EOF


@pytest.fixture
def spawn(run_proxy) -> Callable[..., ProxyProcess]:
    """`spawn(upstream_port, wrapper=(), **config_keys)`: `upgradeproxy run` in front of it."""

    def start(upstream_port: int, wrapper: tuple[str, ...] = (), **keys) -> ProxyProcess:
        return run_proxy(proxy_yaml(upstream_port, **keys), "--no-access-log", prefix=wrapper)

    return start


def tunnel_echoes(port: int, payload: bytes = b"are you there?") -> bool:
    """Open a tunnel through the proxy and check `payload` comes back whole."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(HANDSHAKE)
        head, buf = read_response_head(sock)
        if not head.startswith(b"HTTP/1.1 101"):
            return False
        sock.sendall(payload)
        return recv_exactly(sock, len(payload), buf) == payload


def cpu_over(proc: ProxyProcess, seconds: float) -> float:
    """CPU seconds `proc` uses over a window of `seconds` (a measurement, not a wait)."""
    before = proc.cpu_seconds()
    time.sleep(seconds)
    return proc.cpu_seconds() - before


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_out_of_descriptors_the_proxy_stays_up_idles_and_recovers(spawn, raw_upstream):
    upstream = raw_upstream(ws_echo)
    proxy = spawn(upstream.port, wrapper=("prlimit", "--nofile=128"))
    baseline = proxy.descriptors()
    clients: list[socket.socket] = []
    try:
        for _ in range(200):  # each tunnel costs the proxy two descriptors: 128 cannot hold them
            sock = socket.create_connection((LOOPBACK, proxy.port), timeout=5)
            sock.sendall(HANDSHAKE)
            clients.append(sock)
        answers: dict[bytes, int] = {}
        deadline = time.monotonic() + 5
        pending = {s.fileno(): s for s in clients}
        buffers: dict[int, bytes] = {}
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select(list(pending.values()), [], [], 0.2)
            for sock in ready:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                buffers[sock.fileno()] = buffers.get(sock.fileno(), b"") + data
                if not data or b"\r\n\r\n" in buffers[sock.fileno()]:
                    status = buffers[sock.fileno()][9:12] or b"EOF"
                    answers[status] = answers.get(status, 0) + 1
                    del pending[sock.fileno()]
        switched = answers.get(b"101", 0)
        print(f"200 tunnels attempted under nofile=128: {answers}, {len(pending)} unanswered")
        assert proxy.alive()
        assert 20 < switched < 128, answers  # some tunnels fit, far from all 200
        assert proxy.descriptors() <= 128
        # Saturated with clients still queued in the backlog, the accept loop backs off
        # instead of spinning: well under a core.
        spent = cpu_over(proxy, 2.0)
        print(f"CPU while saturated: {spent:.2f} s over 2 s")
        assert spent < 0.5
    finally:
        for sock in clients:
            sock.close()
    assert eventually(lambda: proxy.descriptors() <= baseline + 4, timeout=15), proxy.descriptors()
    assert eventually(lambda: tunnel_echoes(proxy.port), timeout=15)
    assert proxy.errors() == []


def test_upload_to_an_upstream_that_never_reads_is_bounded_by_back_pressure(spawn, raw_upstream):
    never = threading.Event()
    upstream = raw_upstream(lambda conn: never.wait(60))  # accepts, never reads
    proxy = spawn(upstream.port)
    rss_before = proxy.rss_bytes()
    sent = 0
    chunk = b"x" * 65536
    with socket.create_connection((LOOPBACK, proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        sock.settimeout(2)  # once every buffer on the way is full, a send blocks
        with contextlib.suppress(TimeoutError):
            while sent < 256 * MB:
                sent += sock.send(chunk)
        growth = proxy.rss_bytes() - rss_before
    print(f"upload to a stalled upstream: {sent / MB:.1f} MB accepted, RSS +{growth / MB:.1f} MB")
    # Kernel socket buffers on three sockets (autotuned up to a few MB each) plus one read
    # in flight: never the whole upload.
    assert sent < 64 * MB, sent
    assert growth < 16 * MB, growth
    assert proxy.alive()


def endless_head(conn: RawConn) -> None:
    conn.read_head()
    conn.send(b"HTTP/1.1 200 OK\r\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        conn.send(b"X-Filler: " + b"a" * 1000 + b"\r\n")


def test_an_endless_response_head_is_a_502_in_bounded_memory(spawn, raw_upstream):
    upstream = raw_upstream(endless_head)
    proxy = spawn(upstream.port)
    rss_before = proxy.rss_bytes()
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body, _ = read_response(sock)
    growth = proxy.rss_bytes() - rss_before
    print(f"endless response head: 502, RSS +{growth / MB:.1f} MB")
    assert status == 502
    assert b"502" in body
    assert growth < 8 * MB
    assert proxy.alive()


@pytest.mark.slow
def test_two_thousand_silent_clients_do_not_delay_others(spawn, raw_upstream):
    upstream = raw_upstream(respond_ok_forever)
    proxy = spawn(upstream.port, timeouts={"request_header": "60s"})
    silent: list[socket.socket] = []
    try:
        for _ in range(2000):
            silent.append(socket.create_connection((LOOPBACK, proxy.port), timeout=5))
        assert eventually(lambda: proxy.descriptors() >= 2000, timeout=20)
        times = []
        for _ in range(7):
            started = time.monotonic()
            with socket.create_connection((LOOPBACK, proxy.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                status, _, body, _ = read_response(sock)
            times.append(time.monotonic() - started)
            assert (status, body) == (200, b"ok")
    finally:
        for sock in silent:
            sock.close()
    print(f"served beside 2000 silent clients in {[round(t, 4) for t in times]} s")
    # The bound is 0.5 s; the median must meet it, a single outlier on a loaded
    # shared machine gets four times that.
    assert statistics.median(times) < 0.5, times
    assert max(times) < 2.0, times
    assert proxy.alive()


def test_content_length_with_leading_zeros_goes_upstream_in_canonical_digits(
    make_proxy, raw_upstream
):
    # Found by the fuzzer: the client's "0002" used to be forwarded verbatim.
    upstream = raw_upstream()
    proxy = make_proxy(proxy_yaml(upstream.port))
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0002\r\n\r\nhi")
        conn = upstream.accept()
        head = conn.read_head()
        assert b"\r\nContent-Length: 2\r\n" in head
        assert conn.read_exactly(2) == b"hi"
