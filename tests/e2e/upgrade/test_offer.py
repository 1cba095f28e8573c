"""Rule 1, what goes upstream as an upgrade offer: the protocols a route allows in the client's
order, no offer without `upgrade` in Connection, on a POST or without a key, offers split over
repeated fields, and a malformed WebSocket handshake answered 400 with nothing sent upstream.

A raw-socket upstream sees the exact bytes the proxy sends. Each docstring quotes the contract
(docs/interface.md) sentence or the RFC section it checks."""

from __future__ import annotations

import pytest

from tests.support.clients import (
    raw_client,
    read_response,
    read_response_head,
    recv_exactly,
)
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.sentinels import (
    client_answered_by_the_proxy,
    next_connection_carries_sentinel,
)
from tests.support.wire import (
    SWITCH_WS,
    WS_KEY,
    assert_no_upgrade_offer,
    assert_offer,
    elements,
    names,
    ok_response,
    parse_head,
    request,
    status_of,
    values,
    ws_request,
)

E2E_LINES = [
    b"Sec-WebSocket-Protocol: chat, superchat",
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
    b"Origin: https://app.example",
    b"Cookie: session=abc; theme=dark",
    b"Authorization: Bearer s3cr3t",
]


def test_upgrade_offer_allowed_protocols_in_client_order(make_proxy, raw_upstream, client):
    """Rule 1: "goes upstream with `Connection: upgrade` and an `Upgrade` header holding only
    the protocols the route allows, in the client's order, with every end-to-end header
    (`Sec-WebSocket-*`, `Origin`, `Cookie`, `Authorization`, ...) unchanged." """
    up = raw_upstream()
    route = {"upgrade": ["websocket", "spdy"]}
    proxy = make_proxy(proxy_yaml(up.port, route=route, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(
        ws_request(
            *E2E_LINES,
            upgrade=b"SPDY/3.1, h2c, WebSocket, foo/2",
            connection=b"keep-alive, Upgrade",
        )
    )
    conn = up.accept()
    head = conn.read_head()
    assert head.startswith(b"GET /chat HTTP/1.1\r\n")
    assert_offer(head, [b"SPDY/3.1", b"WebSocket"])
    sent = parse_head(ws_request(*E2E_LINES))[1]
    e2e = {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"origin",
        b"cookie",
        b"authorization",
    }
    assert [f for f in parse_head(head)[1] if f[0].lower() in e2e] == [
        f for f in sent if f[0].lower() in e2e
    ]


def test_upgrade_without_connection_upgrade_is_not_an_offer(make_proxy, raw_upstream, client):
    """Rule 1: "An `Upgrade` header without `upgrade` in `Connection` is not an offer: it is
    dropped (h11 alone would treat it as one)." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request(connection=b"keep-alive"))
    conn = up.accept()
    head = conn.read_head()
    assert_no_upgrade_offer(head)
    assert values(head, b"sec-websocket-key") == [WS_KEY]
    conn.send(ok_response(b"plain"))
    status, headers, body, _ = read_response(c)
    assert (status, body) == (200, b"plain")
    assert b"upgrade" not in headers


@pytest.mark.parametrize(
    ("allow", "offered", "expected"),
    [
        pytest.param(["spdy"], b"SPDY/3.1", [b"SPDY/3.1"], id="bare-name-lets-version-through"),
        pytest.param(["spdy/3.1"], b"spdy/3.1", [b"spdy/3.1"], id="versioned-entry-exact"),
        pytest.param(["spdy/3.1"], b"SPDY/3", [], id="versioned-entry-other-version-stripped"),
        pytest.param(["websocket"], b"SPDY/3.1", [], id="websocket-route-strips-spdy"),
        pytest.param([], b"websocket", [], id="empty-list-strips-everything"),
        pytest.param([], b"websocket, SPDY/3.1, h2c", [], id="empty-list-strips-all-offered"),
    ],
)
def test_route_allow_list(make_proxy, raw_upstream, client, allow, offered, expected):
    """Rule 1 and config: "Protocol tokens may carry a version (`SPDY/3.1`, ...) and match
    case-insensitively." / "`upgrade:` ... [] means none. Any other offered protocol is
    stripped, and the request goes upstream as a plain HTTP request." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, route={"upgrade": allow}))
    c = client(proxy)
    c.sendall(ws_request(upgrade=offered))
    conn = up.accept()
    head = conn.read_head()
    if expected:
        assert_offer(head, expected)
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: "
            + expected[0]
            + b"\r\nConnection: Upgrade\r\n\r\n"
        )
        resp, buf = read_response_head(c)
        assert status_of(resp) == 101
        c.sendall(b"spdy-up")
        assert conn.read_exactly(7) == b"spdy-up"
        conn.send(b"spdy-down")
        assert recv_exactly(c, 9, buf) == b"spdy-down"
    else:
        assert_no_upgrade_offer(head)
        assert values(head, b"sec-websocket-key") == [WS_KEY]  # end-to-end, kept
        conn.send(ok_response(b"plain"))
        status, headers, body, _ = read_response(c)
        assert (status, body) == (200, b"plain")
        assert b"upgrade" not in headers


def test_websocket_on_post_is_not_offered(make_proxy, raw_upstream, client):
    """Rule 1: "`websocket` is offered upstream only on a `GET` with `Sec-WebSocket-Key` and
    `Sec-WebSocket-Version`" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(ws_request(b"Content-Length: 4", method=b"POST", body=b"data"))
    conn = up.accept()
    head = conn.read_head()
    assert head.startswith(b"POST /chat HTTP/1.1\r\n")
    assert_no_upgrade_offer(head)
    assert conn.read_exactly(4) == b"data"
    conn.send(ok_response())
    status, _, body, _ = read_response(c)
    assert (status, body) == (200, b"ok")


def test_websocket_get_without_key_is_not_offered(make_proxy, raw_upstream, client):
    """Rule 1: "`websocket` is offered upstream only on a `GET` with `Sec-WebSocket-Key` and
    `Sec-WebSocket-Version`" """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(request(b"Connection: Upgrade", b"Upgrade: websocket"))
    conn = up.accept()
    assert_no_upgrade_offer(conn.read_head())
    conn.send(ok_response())
    assert read_response(c)[0] == 200


@pytest.mark.parametrize(
    "key_lines",
    [
        pytest.param(
            [b"Sec-WebSocket-Key: not-base64!", b"Sec-WebSocket-Version: 13"], id="key-not-base64"
        ),
        pytest.param(
            [b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA", b"Sec-WebSocket-Version: 13"],
            id="key-15-bytes",
        ),
        pytest.param(
            [
                b"Sec-WebSocket-Key: " + WS_KEY,
                b"Sec-WebSocket-Key: " + WS_KEY,
                b"Sec-WebSocket-Version: 13",
            ],
            id="two-keys",
        ),
        pytest.param(
            [b"Sec-WebSocket-Key: " + WS_KEY, b"Sec-WebSocket-Version: x"], id="version-not-numeric"
        ),
    ],
)
def test_malformed_websocket_handshake_is_400(make_proxy, raw_upstream, client, key_lines):
    """Rule 1: "a malformed WebSocket handshake is a 400." Rule 7: "Nothing of a malformed
    request reaches an upstream." """
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    c = client(proxy)
    c.sendall(request(b"Connection: Upgrade", b"Upgrade: websocket", *key_lines))
    status, _, _, _ = read_response(c)
    assert status == 400
    next_connection_carries_sentinel(proxy.address, up, 0)


def test_offer_split_over_repeated_connection_and_upgrade_fields(make_proxy, raw_upstream):
    """Rule 1: "A request whose `Connection` header lists `upgrade` and whose `Upgrade` header
    offers protocols goes upstream with `Connection: upgrade` and an `Upgrade` header holding
    only the protocols the route allows, in the client's order"; tokens "match
    case-insensitively". RFC 9110 §5.3: repeated fields are one comma list; empty list
    elements are ignored (§5.6.1)."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            ws_request(
                b"Upgrade: ,,WebSocket,,",
                b"Connection: UPGRADE",
                connection=b"keep-alive",
                upgrade=b"foo/1",
            )
        )
        conn = up.accept()
        head = conn.read_head()
        assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
        assert elements(head, b"upgrade") == [b"WebSocket"], head
        conn.send(SWITCH_WS)
        resp, buf = read_response_head(sock)
        assert status_of(resp) == 101
        sock.sendall(b"up!")
        assert conn.read_exactly(3) == b"up!"
        conn.send(b"down!")
        assert recv_exactly(sock, 5, buf) == b"down!"


def test_empty_upgrade_value_is_no_offer(make_proxy, raw_upstream):
    """Rule 1: only an `Upgrade` header that "offers protocols" is an offer; rule 2: "a 101 to
    a request that offered none ... is a 502"."""
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(upgrade=b""))
        conn = up.accept()
        head = conn.read_head()
        assert b"upgrade" not in names(head), head
        assert b"upgrade" not in [t.lower() for t in elements(head, b"connection")], head
        conn.send(SWITCH_WS + b"TUNNEL")
        status, _, _, buf = read_response(sock)
        assert status == 502
        assert b"TUNNEL" not in client_answered_by_the_proxy(sock, buf)
