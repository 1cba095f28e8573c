"""Rule 7, the upstream's errors: refused, closed or garbled before a response 502, too slow 504;
the client's keep-alive connection survives them, and one failing connection never affects
another."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from tests.support.clients import closed_by_peer, free_port, raw_client, read_response
from tests.support.configs import FAST_DRAIN, config_yaml, proxy_yaml, route
from tests.support.peers import RawConn, RawUpstream, recording_ok
from tests.support.wire import assert_short_error

Response = tuple[int, dict[bytes, bytes], bytes, bytearray]


def error_exchange(sock: socket.socket, data: bytes) -> Response:
    sock.sendall(data)
    status, headers, body, rest = read_response(sock)
    assert_short_error(body)
    return status, headers, body, rest


def assert_400_then_close(address: tuple[str, int], data: bytes) -> None:
    with raw_client(address) as sock:
        status, headers, _, rest = error_exchange(sock, data)
        assert status == 400, (status, data)
        # "then close": the proxy says so or just does it; we require that it does it.
        assert closed_by_peer(sock, rest), f"connection stayed open after 400 for {data!r}"
        if b"connection" in headers:
            assert headers[b"connection"].lower() == b"close"


def _isolation_yaml(dead_port: int, good: RawUpstream) -> str:
    """/dead goes to a port nothing listens on, everything else to `good`."""
    return config_yaml({"dead": dead_port, "good": good.port},
                       [route("dead", path_prefix="/dead"), route("good")],
                       timeouts=FAST_DRAIN)  # fmt: skip


MALFORMED = {
    "content-length-and-transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-and-content-length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n"
    ),
    "two-differing-content-lengths": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "differing-content-length-list": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!"
    ),
    "content-length-abc": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "content-length-minus-1": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "content-length-plus-5": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "obs-fold-spaces": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  continued\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tcontinued\r\n\r\n",
    "whitespace-before-colon-host": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "whitespace-before-colon-other": b"GET / HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "garbage-request-line": b"GARBAGE\r\n\r\n",
    "unknown-http-version": b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n",
    "missing-target": b"GET HTTP/1.1\r\nHost: x\r\n\r\n",
    "empty-target": b"GET  HTTP/1.1\r\nHost: x\r\n\r\n",
    "http11-without-host": b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
    "two-host-headers": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
}


def _close_after_head(conn: RawConn) -> None:
    conn.read_head()
    conn.close()


def _close_at_once(conn: RawConn) -> None:
    conn.close()


def _garbage(conn: RawConn) -> None:
    conn.read_head()
    conn.send(b"this is not HTTP at all\r\n\r\n")
    conn.read_until_close(timeout=10)


def _reset_mid_head(conn: RawConn) -> None:
    conn.read_head()
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Len")
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST


UPSTREAM_FAILURES = {
    "accepts-then-closes-without-answer": _close_after_head,
    "accepts-and-closes-at-once": _close_at_once,
    "sends-garbage": _garbage,
    "resets-mid-head": _reset_mid_head,
}


def test_502_upstream_refused(make_proxy):
    proxy = make_proxy(proxy_yaml(free_port(), timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        status, _, _, _ = error_exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 502


@pytest.mark.parametrize("handler", list(UPSTREAM_FAILURES.values()), ids=list(UPSTREAM_FAILURES))
def test_502_upstream_fails_before_a_response(make_proxy, raw_upstream, handler):
    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        status, _, body, _ = error_exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 502
        # The upstream's garbage is never relayed to the client.
        assert b"not HTTP" not in body


def test_502_then_client_connection_still_works(make_proxy, raw_upstream):
    """A 502 is the upstream's fault: the client's keep-alive connection survives it."""
    heads: list[bytes] = []
    good = raw_upstream(recording_ok(heads))
    dead = free_port()
    proxy = make_proxy(_isolation_yaml(dead, good))
    with raw_client(proxy.address) as sock:
        status, _, _, rest = error_exchange(sock, b"GET /dead HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 502
        sock.sendall(b"GET /alive HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(sock, rest)
        assert (status, body) == (200, b"ok")


def _never_answers(conn: RawConn) -> None:
    conn.read_head()
    conn.read_until_close(timeout=20)


def test_504_upstream_too_slow(make_proxy, raw_upstream):
    up = raw_upstream(_never_answers)
    proxy = make_proxy(
        proxy_yaml(up.port, timeouts={"upstream_response": "300ms", "drain": 1})
    )
    with raw_client(proxy.address) as sock:
        status, _, _, _ = error_exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 504
    # The request did reach the upstream (it was valid); the upstream was just too slow.
    assert len(up.conns) == 1


def test_one_connection_failing_never_affects_another(make_proxy, raw_upstream):
    heads: list[bytes] = []
    good = raw_upstream(recording_ok(heads))
    proxy = make_proxy(_isolation_yaml(free_port(), good))
    errors: list[str] = []
    stop = threading.Event()

    def troublemaker() -> None:
        """Alternates 502s and 400s on fresh connections until told to stop."""
        n = 0
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            n += 1
            try:
                with raw_client(proxy.address) as bad:
                    if n % 2:
                        status = error_exchange(bad, b"GET /dead HTTP/1.1\r\nHost: x\r\n\r\n")[0]
                        want = 502
                    else:
                        status = error_exchange(bad, MALFORMED["two-differing-content-lengths"])[0]
                        want = 400
                    if status != want:
                        errors.append(f"troublemaker got {status}, wanted {want}")
            except (OSError, EOFError, AssertionError) as exc:
                errors.append(f"troublemaker: {exc!r}")

    with raw_client(proxy.address) as sock:
        # Deterministic interleaving first: good, 502, good, 400, good.
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        with raw_client(proxy.address) as bad:
            assert error_exchange(bad, b"GET /dead HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 502
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert_400_then_close(proxy.address, MALFORMED["content-length-and-transfer-encoding"])
        sock.sendall(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200

        # Then concurrently: a second thread keeps failing while this keep-alive client works.
        thread = threading.Thread(target=troublemaker, daemon=True)
        thread.start()
        try:
            for i in range(30):
                sock.sendall(b"GET /steady/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                status, _, body, rest = read_response(sock)
                assert (status, body, bytes(rest)) == (200, b"ok", b"")
        finally:
            stop.set()
            thread.join(25)
    assert not thread.is_alive()
    assert errors == []
    paths = [h.split(b" ")[1] for h in heads]
    assert b"/dead" not in paths
    assert paths[:3] == [b"/first", b"/second", b"/third"]
    assert paths[3:] == [b"/steady/%d" % i for i in range(30)]
