"""Rule 14, `limits.max_connections_per_ip` (a 429, then recovery; idle connections count from the
accept; the client behind a trusted proxy is the one counted), and `limits.max_connections`
across listeners (extra clients wait in the backlog, neither served nor refused)."""

from __future__ import annotations

import logging
import socket

from websockets.sync.client import connect

from tests.support.access_log import access_records
from tests.support.clients import (
    LOOPBACK,
    free_port,
    raw_client,
    read_response,
    readable,
)
from tests.support.configs import config_yaml, proxy_yaml, route
from tests.support.peers import respond_ok_forever
from tests.support.waiting import WAIT, eventually


def limited_request(proxy, extra: bytes = b"") -> tuple[int, dict[bytes, bytes], bool]:
    """(status, headers, closed after) for a first request on a new connection."""
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n%s\r\n" % extra)
        status, headers, _, rest = read_response(sock)
        sock.settimeout(WAIT)
        closed = status == 429 and not rest and sock.recv(1) == b""
    return status, headers, closed


def test_limit_refuses_with_429_then_recovers_after_a_close(make_proxy, ws_upstream, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, limits={"max_connections_per_ip": 2}))
    # A keep-alive HTTP connection counts as much as a tunnel does.
    held = raw_client(proxy.address)
    held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    read_response(held)  # the websockets upstream answers a plain GET with an error page
    with connect(proxy.url("/a"), open_timeout=WAIT) as first:
        status, headers, closed = limited_request(proxy)
        assert (status, headers[b"connection"], closed) == (429, b"close", True)
        assert eventually(lambda: any(r["status"] == 429 for r in access_records(caplog, "http")))
        refusal = next(r for r in access_records(caplog, "http") if r["status"] == 429)
        assert "max_connections_per_ip" in str(refusal["error"])
        text = proxy.telemetry.render()
        assert 'upgradeproxy_limit_refusals_total{route="*/"} 1.0' in text
        first.close()
        # Recovery: the closed tunnel gives its slot back.
        assert eventually(lambda: limited_request(proxy)[0] != 429)
    held.close()
    assert eventually(lambda: proxy.call(lambda: dict(proxy.proxy.shared.per_ip.counts)) == {})


def test_idle_connections_hold_their_slots_from_the_accept(make_proxy, raw_upstream):
    """A client holding connections that have sent nothing yet holds them all the same."""
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, limits={"max_connections_per_ip": 2}))
    idle = [raw_client(proxy.address), raw_client(proxy.address)]
    try:
        assert eventually(lambda: proxy.call(lambda: dict(proxy.proxy.shared.per_ip.counts))
                          == {LOOPBACK: 2})  # fmt: skip
        assert limited_request(proxy)[0] == 429
        idle[0].close()
        assert eventually(lambda: limited_request(proxy)[0] == 200)
    finally:
        for sock in idle:
            sock.close()


def test_limit_counts_the_client_behind_a_trusted_proxy(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(
        proxy_yaml(up.port, limits={"max_connections_per_ip": 1}, trusted_proxies=["127.0.0.0/8"])
    )
    held = raw_client(proxy.address)
    try:
        held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n")
        assert read_response(held)[0] == 200
        assert limited_request(proxy, b"X-Forwarded-For: 198.51.100.7\r\n")[0] == 429
        assert limited_request(proxy, b"X-Forwarded-For: 198.51.100.8\r\n")[0] == 200
        # A trusted hop between is skipped: the client is still 198.51.100.7.
        extra_hop = b"X-Forwarded-For: 198.51.100.7, 127.0.0.9\r\n"
        assert limited_request(proxy, extra_hop)[0] == 429
    finally:
        held.close()


def test_max_connections_leaves_extra_clients_in_the_backlog(make_proxy, raw_upstream, caplog):
    """The limit counts across listeners: two clients on one listener fill it, a third on
    the other is neither served nor refused until one of the first two closes (checked once
    the proxy has settled: it has done all it would with the third). Nothing is logged as a
    warning or an error."""
    caplog.set_level(logging.INFO, logger="upgradeproxy")
    web = raw_upstream(respond_ok_forever)
    port, other = free_port(), free_port()
    proxy = make_proxy(
        config_yaml(
            {"web": web.port}, [route("web")], listen=[port, other], limits={"max_connections": 2}
        )
    )
    request = b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n"
    first, second = (socket.create_connection((LOOPBACK, port), timeout=WAIT) for _ in "12")
    for sock in (first, second):  # a quiet listener holds no slot: both are served
        sock.sendall(request)
        assert read_response(sock)[0] == 200
    with socket.create_connection((LOOPBACK, other), timeout=WAIT) as third:  # the kernel queues it
        third.sendall(request)
        proxy.settle()
        assert not readable(third)  # neither an answer nor a close
        first.close()
        assert read_response(third)[0] == 200
    second.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
