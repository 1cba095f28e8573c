"""Nothing lost on a keep-alive connection at a drain or an upgrade (contract "Operations
additions"): from the moment the drain or retirement begins responses carry `Connection:
close`; an idle keep-alive connection stays open for `timeouts.keepalive_drain`, and a request
that arrives on it in that time is answered (then the connection closes); after it, an idle
connection is closed only when no byte of a next request has arrived on it.

Real `python -m upgradeproxy run` processes, raw-socket clients and upstreams on loopback.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from tests.support.clients import (
    LOOPBACK,
    free_port,
    read_response,
    read_response_head,
    recv_exactly,
    refused,
)
from tests.support.configs import config_yaml, route
from tests.support.metrics import scrape, value
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.processes import ProxyProcess
from tests.support.waiting import WAIT, eventually
from tests.support.wire import ok_response

GET = "GET {} HTTP/1.1\r\nHost: svc.test\r\n\r\n"


def get(path: str) -> bytes:
    return GET.format(path).encode()


def config(web: int, admin: int | None = None, **top: object) -> tuple[int, str]:
    """A listener on a free port with `/web` (and `/down`, a port nothing listens on)."""
    port = free_port()
    upstreams = {"web": web, "down": free_port()}
    routes = [route("down", path_prefix="/down"), route("web", path_prefix="/")]
    return port, config_yaml(upstreams, routes, listen=[port], admin=admin, **top)


def keepalive_client(port: int) -> socket.socket:
    """A connection that has carried one request and now idles, kept alive."""
    sock = socket.create_connection((LOOPBACK, port), timeout=WAIT)
    sock.sendall(get("/web"))
    status, headers, body, _ = read_response(sock)
    assert (status, body, headers.get(b"connection")) == (200, b"ok", None)
    return sock


def accepted_client(port: int) -> socket.socket:
    """A connection that has sent nothing yet (the proxy accepts it, or finds it in the queue
    when the listener closes)."""
    return socket.create_connection((LOOPBACK, port), timeout=WAIT)


def eof_not_reset(sock: socket.socket) -> bool:
    """The proxy closed `sock` with a FIN (recv gives b""), not a reset."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return False


def begin(proc: ProxyProcess, how: str, port: int) -> None:
    """SIGTERM (wait until the listener refuses: the drain is past the point where idle
    connections used to be cut) or SIGUSR2 (wait until the old process retires)."""
    if how == "SIGTERM":
        proc.signal(signal.SIGTERM)
        proc.wait_log("draining", signal="SIGTERM")
        assert eventually(lambda: refused(port))
    else:
        proc.signal(signal.SIGUSR2)
        proc.wait_log("upgrade: new process accepts; retiring")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGUSR2"])
def test_a_request_inside_the_grace_is_answered_with_connection_close(run_proxy, raw_upstream, how):
    """Within `keepalive_drain` of the drain's start: a request on an idle keep-alive connection
    and the first request of a connection accepted before are answered, each with `Connection:
    close` (a 200 relayed, and a 502 the proxy writes itself); then the connection closes."""
    web = raw_upstream(respond_ok_forever)
    admin = free_port()
    port, text = config(web.port, admin, timeouts={"keepalive_drain": 8})
    proc = run_proxy(text)
    idle, fresh = keepalive_client(port), accepted_client(port)
    with idle, fresh:
        # Both accepted by this process (not left in the queue for the next generation).
        assert eventually(lambda: value(scrape(admin), "upgradeproxy_connections_active") == 2)
        begin(proc, how, port)
        idle.sendall(get("/web"))
        fresh.sendall(get("/down"))
        status, headers, body, rest = read_response(idle)
        assert (status, body, headers[b"connection"], rest) == (200, b"ok", b"close", b"")
        status, headers, _, rest = read_response(fresh)
        assert (status, headers[b"connection"], rest) == (502, b"close", b"")
        assert eof_not_reset(idle)
        assert eof_not_reset(fresh)
    assert proc.wait_exit() == 0


@pytest.mark.parametrize("grace", [1, 0])
def test_a_connection_idle_past_the_grace_is_closed_with_a_fin(run_proxy, raw_upstream, grace):
    """An idle keep-alive connection and one that never sent a request stay open for the grace
    (`0`: closed at once), then close cleanly: the client reads EOF, not a reset."""
    web = raw_upstream(respond_ok_forever)
    port, text = config(web.port, timeouts={"keepalive_drain": grace})
    proc = run_proxy(text)
    idle, fresh = keepalive_client(port), accepted_client(port)
    with idle, fresh:
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert eof_not_reset(idle)
        assert eof_not_reset(fresh)
        assert time.monotonic() - signalled >= grace  # the grace, not the signal, closed them
    assert proc.wait_exit() == 0


@pytest.mark.parametrize("grace", ["1s", 0])
def test_a_pipelined_request_behind_a_slow_response_is_answered(run_proxy, raw_upstream, grace):
    """A response whose head left before the drain, its body held back by a slow upstream, and a
    next request pipelined behind it, its bytes waiting in the proxy: once the body is done the
    waiting request is answered (`Connection: close`), not reset by the close -- even when
    `keepalive_drain` is 0."""
    reached, release = threading.Event(), threading.Event()

    def upstream(conn: RawConn) -> None:
        while True:
            head = conn.read_head(timeout=WAIT)
            if head.startswith(b"GET /slow "):
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
                reached.set()
                release.wait(WAIT)
                conn.send(b"-half")
            else:
                conn.send(ok_response(b"next"))

    web = raw_upstream(upstream)
    port, text = config(web.port, timeouts={"keepalive_drain": grace})
    proc = run_proxy(text)
    with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
        sock.sendall(get("/slow") + get("/next"))
        assert reached.wait(WAIT)
        head, buf = read_response_head(sock)
        assert b"connection: close" not in head.lower(), head  # it left before the drain
        assert recv_exactly(sock, 5, buf) == b"first"
        proc.signal(signal.SIGTERM)
        proc.wait_log("draining", signal="SIGTERM")
        assert eventually(lambda: refused(port))
        release.set()
        assert recv_exactly(sock, 5, buf) == b"-half"
        status, headers, body, rest = read_response(sock, buf)
        assert (status, body, headers[b"connection"], rest) == (200, b"next", b"close", b"")
        assert eof_not_reset(sock)
    assert proc.wait_exit() == 0
    assert [(r["path"], r["status"]) for r in proc.matching(lambda r: r.get("msg") == "http")] == [
        ("/slow", 200),
        ("/next", 200),
    ]


def test_a_response_that_starts_during_the_drain_says_connection_close(run_proxy, raw_upstream):
    """An exchange in flight when the drain begins, its response head not yet written: the
    head carries `Connection: close`, and a request pipelined behind it is not read (the client
    retries it, RFC 9112 section 9.3.2); the connection still ends with a FIN, not a reset
    that could destroy the response."""
    reached, release = threading.Event(), threading.Event()

    def upstream(conn: RawConn) -> None:
        conn.read_head(timeout=WAIT)
        reached.set()
        release.wait(WAIT)
        conn.send(ok_response(b"late"))

    web = raw_upstream(upstream)
    port, text = config(web.port)
    proc = run_proxy(text)
    with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
        sock.sendall(get("/late"))
        assert reached.wait(WAIT)
        proc.signal(signal.SIGTERM)
        proc.wait_log("draining", signal="SIGTERM")
        sock.sendall(get("/pipelined"))
        release.set()
        status, headers, body, rest = read_response(sock)
        assert (status, body, headers[b"connection"], rest) == (200, b"late", b"close", b"")
        assert eof_not_reset(sock)
    assert proc.wait_exit() == 0
