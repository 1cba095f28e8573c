"""Rule 4: X-Forwarded-For/-Proto/-Host, Forwarded and Via: replaced for an untrusted peer,
appended for a trusted one, on plain requests and upgrades alike, as the upstream sees them."""

from __future__ import annotations

import socket

import pytest
from websockets.sync.client import connect

from tests.support.clients import (
    raw_client,
    read_response,
    read_response_head,
)
from tests.support.configs import FAST_DRAIN, listener, proxy_yaml
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.waiting import WAIT
from tests.support.wire import (
    SWITCH_WS,
    elements,
    ok_response,
    request,
    status_of,
    values,
    ws_request,
)

CLIENT_FORWARDING = (
    b"X-Forwarded-For: 1.2.3.4",
    b"X-Forwarded-Proto: https",
    b"X-Forwarded-Host: evil.example",
    b"Forwarded: for=1.2.3.4;proto=https",
    b"Via: 1.0 fred",
)


def exchange_head(c, up, req: bytes, upgrade: bool) -> bytes:
    """Send `req`, return the head the upstream got, finish the exchange."""
    c.sendall(req)
    conn = up.accept()
    head = conn.read_head()
    conn.send(SWITCH_WS if upgrade else ok_response())
    resp, _ = read_response_head(c)
    assert status_of(resp) == (101 if upgrade else 200)
    return head


def assert_proxy_via(head: bytes) -> None:
    """RFC 9110 §7.6.3: the proxy appends `received-protocol received-by` after earlier hops."""
    via = elements(head, b"via")
    assert via[:-1] == [b"1.0 fred"], head
    protocol, _, received_by = via[-1].partition(b" ")
    assert protocol in (b"1.1", b"HTTP/1.1"), head
    assert received_by, head


@pytest.mark.parametrize("upgrade", [False, True], ids=["plain", "upgrade"])
def test_forwarding_headers_replaced_for_untrusted_peer(make_proxy, raw_upstream, client, upgrade):
    """Rule 4: "Adds `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`.
    Client-supplied ones are replaced, unless the peer is in `trusted_proxies`" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    req = (ws_request if upgrade else request)(*CLIENT_FORWARDING)
    head = exchange_head(c, up, req, upgrade)
    assert values(head, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(head, b"x-forwarded-proto") == [b"http"]
    assert values(head, b"x-forwarded-host") == [b"app.example"]
    assert b"1.2.3.4" not in head  # the client's Forwarded claim is gone too
    assert_proxy_via(head)


@pytest.mark.parametrize("upgrade", [False, True], ids=["plain", "upgrade"])
def test_forwarding_headers_appended_for_trusted_peer(make_proxy, raw_upstream, client, upgrade):
    """Rule 4: "... unless the peer is in `trusted_proxies`, in which case the proxy appends to
    them." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, trusted_proxies=["127.0.0.1/32"]))
    c = client(proxy)
    req = (ws_request if upgrade else request)(*CLIENT_FORWARDING)
    head = exchange_head(c, up, req, upgrade)
    assert b", ".join(values(head, b"x-forwarded-for")) == b"1.2.3.4, 127.0.0.1"
    assert elements(head, b"x-forwarded-proto")[0] == b"https"
    assert elements(head, b"x-forwarded-host")[0] == b"evil.example"
    forwarded = elements(head, b"forwarded")
    assert forwarded[0] == b"for=1.2.3.4;proto=https"
    assert forwarded[-1].lower().startswith(b"for=127.0.0.1"), head
    assert_proxy_via(head)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_several_x_forwarded_for_fields(make_proxy, raw_upstream, trusted):
    """Rule 4: "Client-supplied ones are replaced, unless the peer is in `trusted_proxies`, in
    which case the proxy appends to them." Several `X-Forwarded-For` fields are one list (RFC
    9110 §5.3): appended to in order when trusted, replaced when not."""
    up = raw_upstream(respond_ok_forever)
    keys = {"trusted_proxies": ["127.0.0.0/8"]} if trusted else {}
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, **keys))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\n"
            b"X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\nForwarded: for=9.9.9.9\r\n\r\n"
        )
        assert read_response(sock)[0] == 200
    head = up.accept().heads[0]
    xff = elements(head, b"x-forwarded-for")
    if trusted:
        assert xff == [b"1.1.1.1", b"2.2.2.2", b"3.3.3.3", b"127.0.0.1"], head
    else:
        assert xff == [b"127.0.0.1"], head
        assert b"9.9.9.9" not in head


def test_via_appended_on_the_response(make_proxy, raw_upstream):
    """Rule 4 / RFC 9110 §7.6.3: each intermediary appends its own `Via` element, after those
    already present; README: "`Via` is always appended ..., on requests and responses"."""

    def handler(conn: RawConn) -> None:
        conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nVia: 1.1 backend-lb\r\nContent-Length: 2\r\n\r\nok")

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = read_response_head(sock)
    via = elements(head, b"via")
    assert len(via) == 2, head
    assert via[0] == b"1.1 backend-lb", head


def test_upstream_sees_end_to_end_and_forwarding_headers(make_proxy, ws_upstream):
    """Rule 1: the request "goes upstream with `Connection: upgrade` and an `Upgrade` header
    holding only the protocols the route allows ... with every end-to-end header
    (`Sec-WebSocket-*`, `Origin`, `Cookie`, `Authorization`, ...) unchanged"; rule 4: the proxy
    adds `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    extra = {"Cookie": "session=abc123; theme=dark", "Authorization": "Bearer s3cr3t.t0ken"}
    with connect(
        proxy.url("/headers?x=1"),
        open_timeout=WAIT,
        origin="http://app.example",
        additional_headers=extra,
    ) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "x"
        sent = ws.request.headers
    got = up.requests[0]
    assert got.path == "/headers?x=1"
    for name in ("Origin", "Cookie", "Authorization", "Sec-WebSocket-Key", "Sec-WebSocket-Version"):
        assert got.headers.get_all(name) == sent.get_all(name), name
    assert got.headers["Origin"] == "http://app.example"
    assert got.headers["Cookie"] == "session=abc123; theme=dark"
    assert got.headers["Authorization"] == "Bearer s3cr3t.t0ken"
    assert got.headers.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert got.headers.get_all("X-Forwarded-Proto") == ["http"]
    assert got.headers.get_all("X-Forwarded-Host") == [sent["Host"]]
    assert "upgradeproxy" in got.headers["Via"]
    assert [v.lower() for v in got.headers.get_all("Connection")] == ["upgrade"]
    assert [v.lower() for v in got.headers.get_all("Upgrade")] == ["websocket"]


def test_client_supplied_forwarding_headers_are_replaced(make_proxy, ws_upstream):
    """Rule 4: "Client-supplied ones are replaced, unless the peer is in `trusted_proxies`"
    (it is not here): a client cannot spoof its address, scheme or host to the upstream."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    spoofed = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
    }
    with connect(proxy.url("/"), open_timeout=WAIT, additional_headers=spoofed) as ws:
        ws.send("x")
        assert ws.recv(timeout=WAIT) == "x"
        host = ws.request.headers["Host"]
    got = up.requests[0].headers
    assert got.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert got.get_all("X-Forwarded-Proto") == ["http"]
    assert got.get_all("X-Forwarded-Host") == [host]


def test_ipv6_loopback_listener(make_proxy, raw_upstream):
    """A listener on [::1] serves IPv6 clients, and X-Forwarded-For carries the bare address."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    up = raw_upstream(respond_ok_forever)
    try:
        proxy = make_proxy(proxy_yaml(up.port, listen=listener("[::1]:0")))
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    with socket.create_connection(("::1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n")
        status, _, _, _ = read_response(sock)
    assert status == 200
    assert b"X-Forwarded-For: ::1\r\n" in up.accept().heads[0]
