"""The proxy's wire behaviour for upgrades, hop-by-hop and forwarding headers (rules 1-4).

Every test drives a raw-socket upstream from the test thread, so it sees the exact bytes the
proxy sends and chooses the exact bytes it answers with. Each docstring quotes the contract
(/work/shared/interface.md) sentence or the CVE the test guards.
"""

from __future__ import annotations

import contextlib
import socket

import pytest

from tests.support.clients import (
    read_response,
    read_response_head,
    read_to_eof,
    readable,
    recv_exactly,
)
from tests.support.configs import proxy_yaml
from tests.support.peers import RawConn
from tests.support.sentinels import (
    client_answered_by_the_proxy,
    next_connection_carries_sentinel,
    next_request_follows,
    nothing_more_upstream,
)
from tests.support.waiting import eventually
from tests.support.wire import (
    SWITCH_WS,
    WS_ACCEPT,
    WS_KEY,
    elements,
    names,
    ok_response,
    parse_head,
    status_of,
    values,
    ws_request,
)

HOST = b"app.example"
# A masked client text frame "Hello" (RFC 6455 §5.7) and an unmasked server one.
CLIENT_FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
SERVER_FRAME = b"\x81\x05Hello"
H2_SETTINGS = b"AAMAAABkAARAAAAAAAIAAAAA"
H2_SERVER_PREFACE = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame

SWITCH_H2C = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


# --- helpers -------------------------------------------------------------------------


def config(port: int, route: dict | None = None, **keys) -> str:
    """A one-route config with a short drain so a stray tunnel cannot slow teardown."""
    return proxy_yaml(port, route=route, timeouts={"drain": 1}, **keys)


def request(
    *lines: bytes, target: bytes = b"/chat", method: bytes = b"GET", body: bytes = b""
) -> bytes:
    head = [method + b" " + target + b" HTTP/1.1", b"Host: " + HOST, *lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def upstream_sees_nothing_more(conn) -> bytes:
    """Everything `conn` receives until the proxy closes it (must close within 5 s)."""
    return conn.read_until_close(timeout=5)


def assert_no_upgrade_offer(head: bytes) -> None:
    """A plain request upstream: no Upgrade, no `upgrade` in Connection, no HTTP2-Settings."""
    assert b"upgrade" not in names(head), head
    assert b"http2-settings" not in names(head), head
    assert b"upgrade" not in [t.lower() for t in elements(head, b"connection")], head


def assert_offer(head: bytes, protocols: list[bytes]) -> None:
    assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
    assert elements(head, b"upgrade") == protocols, head


# --- rule 1: upgrade pass-through ------------------------------------------------------

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
    proxy = make_proxy(config(up.port, route={"upgrade": ["websocket", "spdy"]}))
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
    proxy = make_proxy(config(up.port))
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
    proxy = make_proxy(config(up.port, route={"upgrade": allow}))
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
    proxy = make_proxy(config(up.port))
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
    proxy = make_proxy(config(up.port))
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
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(request(b"Connection: Upgrade", b"Upgrade: websocket", *key_lines))
    status, _, _, _ = read_response(c)
    assert status == 400
    next_connection_carries_sentinel(proxy.address, up, 0)


# --- rule 2: switch only on a real 101 -------------------------------------------------


def test_real_101_switches_and_bytes_flow(make_proxy, raw_upstream, client):
    """Rule 2: "Only when the upstream answers `101 Switching Protocols` with an `Upgrade`
    naming one of the protocols sent (and, for `websocket`, the right `Sec-WebSocket-Accept`)
    does the proxy relay that 101 (with its `Upgrade`/`Connection` and end-to-end headers) and
    then splice raw bytes both ways." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    assert_offer(conn.read_head(), [b"websocket"])
    conn.send(SWITCH_WS[:-2] + b"Sec-WebSocket-Protocol: chat\r\n\r\n")
    head, buf = read_response_head(c)
    assert status_of(head) == 101
    assert elements(head, b"upgrade") == [b"websocket"]
    assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"]
    assert values(head, b"sec-websocket-accept") == [WS_ACCEPT]
    assert values(head, b"sec-websocket-protocol") == [b"chat"]
    c.sendall(CLIENT_FRAME)
    assert conn.read_exactly(len(CLIENT_FRAME)) == CLIENT_FRAME
    conn.send(SERVER_FRAME)
    assert recv_exactly(c, len(SERVER_FRAME), buf) == SERVER_FRAME
    # Not HTTP any more: request-looking bytes pass through untouched.
    c.sendall(b"GET /raw HTTP/1.1\r\n\r\n")
    assert conn.read_exactly(21) == b"GET /raw HTTP/1.1\r\n\r\n"


def assert_502_and_no_tunnel(c, conn, leaked: bytes) -> None:
    """The client gets a 502 and never `leaked`; client bytes never reach `conn`."""
    status, headers, _, buf = read_response(c)
    assert status == 502
    assert b"upgrade" not in headers
    # The client's next bytes (a request the proxy answers itself) are no tunnel data.
    assert leaked not in client_answered_by_the_proxy(c, buf)
    # The failed upstream connection is closed, never spliced and never reused.
    assert upstream_sees_nothing_more(conn) == b""


@pytest.mark.parametrize(
    ("upgrade_line", "answer"),
    [
        pytest.param(b"websocket", SWITCH_H2C, id="protocol-not-offered"),
        pytest.param(
            b"websocket",
            SWITCH_WS.replace(b"Upgrade: websocket", b"Upgrade: foo"),
            id="other-protocol-right-accept",
        ),
        pytest.param(
            b"websocket",
            SWITCH_WS.replace(WS_ACCEPT, b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            id="bad-accept",
        ),
        pytest.param(
            b"websocket",
            SWITCH_WS.replace(b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n", b""),
            id="missing-accept",
        ),
        pytest.param(
            b"websocket", SWITCH_WS.replace(b"Upgrade: websocket\r\n", b""), id="missing-upgrade"
        ),
    ],
)
def test_bad_101_is_502(make_proxy, raw_upstream, client, upgrade_line, answer):
    """Rule 2: "A 101 naming a protocol that was not offered, ... or a bad
    `Sec-WebSocket-Accept` is a 502." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request(upgrade=upgrade_line))
    conn = up.accept()
    conn.read_head()
    conn.send(answer + b"TUNNEL-DATA")
    assert_502_and_no_tunnel(c, conn, b"TUNNEL-DATA")


@pytest.mark.parametrize(
    "req",
    [
        pytest.param(request(target=b"/plain"), id="plain-get"),
        pytest.param(ws_request(connection=b"keep-alive"), id="upgrade-without-connection"),
        pytest.param(ws_request(method=b"POST", body=b""), id="websocket-on-post"),
    ],
)
def test_101_to_request_that_offered_none_is_502(make_proxy, raw_upstream, client, req):
    """Rule 2: "a 101 to a request that offered none ... is a 502." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(req)
    conn = up.accept()
    assert_no_upgrade_offer(conn.read_head())
    conn.send(SWITCH_WS + b"TUNNEL-DATA")
    assert_502_and_no_tunnel(c, conn, b"TUNNEL-DATA")


def test_101_to_route_allowing_none_is_502(make_proxy, raw_upstream, client):
    """Rule 2 with `upgrade: []`: the offer was stripped, so the upstream's 101 answers a
    request that offered none: "a 101 to a request that offered none ... is a 502." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port, route={"upgrade": []}))
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    assert_no_upgrade_offer(conn.read_head())
    conn.send(SWITCH_WS + b"TUNNEL-DATA")
    assert_502_and_no_tunnel(c, conn, b"TUNNEL-DATA")


NON_101 = [
    pytest.param(
        b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        200,
        b"hello",
        id="200",
    ),
    pytest.param(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied", 403, b"denied", id="403"
    ),
    pytest.param(
        b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n",
        426,
        b"nope",
        id="426-chunked",
    ),
    pytest.param(
        b"HTTP/1.1 400 Bad Request\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nbad",
        400,
        b"bad",
        id="400",
    ),
]


@pytest.mark.parametrize(("answer", "status", "body"), NON_101)
def test_non_101_relayed_and_connection_stays_http(
    make_proxy, raw_upstream, client, answer, status, body
):
    """Rule 2: "Any other status is relayed as an ordinary response (its `Upgrade` header
    stripped), that upstream connection is not reused, and the client connection stays HTTP:
    what the client sends next is parsed as a new request and routed like any other, never
    passed on raw." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request())
    first = up.accept(0)
    first.read_head()
    first.send(answer)
    got_status, headers, got_body, buf = read_response(c)
    assert (got_status, got_body) == (status, body)
    assert b"upgrade" not in headers
    assert b"upgrade" not in headers.get(b"connection", b"").lower()
    assert not buf

    c.sendall(request(b"X-Second: yes", target=b"/second"))
    second = up.accept(1)
    head = second.read_head()
    assert head.startswith(b"GET /second HTTP/1.1\r\n")
    assert values(head, b"x-second") == [b"yes"]
    assert values(head, b"x-forwarded-for") == [b"127.0.0.1"]  # proxied, not tunnelled
    second.send(ok_response(b"second"))
    got_status, _, got_body, _ = read_response(c)
    assert (got_status, got_body) == (200, b"second")
    assert upstream_sees_nothing_more(first) == b""


@pytest.mark.parametrize(
    "status_line",
    [
        pytest.param(b"HTTP/1.1 302 Found", id="302"),
        pytest.param(b"HTTP/1.1 307 Temporary Redirect", id="307"),
        pytest.param(b"HTTP/1.1 308 Permanent Redirect", id="308"),
    ],
)
def test_3xx_to_upgrade_is_relayed_not_followed(make_proxy, raw_upstream, client, status_line):
    """Rule 2: "3xx answers to an upgrade are relayed, never followed." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    location = b"http://127.0.0.1:%d/elsewhere" % up.port
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    conn.read_head()
    conn.send(
        status_line + b"\r\nLocation: " + location + b"\r\nUpgrade: websocket\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    status, headers, _, _ = read_response(c)
    assert status == int(status_line.split(b" ")[1])
    assert headers[b"location"] == location
    assert b"upgrade" not in headers
    next_connection_carries_sentinel(proxy.address, up, 1)  # the redirect was not followed
    assert upstream_sees_nothing_more(conn) == b""


# --- rule 2: early bytes ---------------------------------------------------------------


def test_early_client_bytes_held_until_101(make_proxy, raw_upstream, client):
    """Rule 2: "Bytes the client sent behind its request head are held (up to a small bound)
    and reach the upstream only after that 101" """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request() + CLIENT_FRAME)
    conn = up.accept()
    assert_offer(conn.read_head(), [b"websocket"])
    nothing_more_upstream(proxy, conn)  # the frame must wait for the 101
    conn.send(SWITCH_WS)
    head, buf = read_response_head(c)
    assert status_of(head) == 101
    assert conn.read_exactly(len(CLIENT_FRAME)) == CLIENT_FRAME
    conn.send(SERVER_FRAME)
    assert recv_exactly(c, len(SERVER_FRAME), buf) == SERVER_FRAME


def test_upstream_bytes_behind_101_reach_client_first(make_proxy, raw_upstream, client):
    """Rule 2: "bytes behind the upstream's 101 head reach the client first thing after it." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request())
    conn = up.accept()
    conn.read_head()
    conn.send(SWITCH_WS + SERVER_FRAME)
    head, buf = read_response_head(c)
    assert status_of(head) == 101
    assert recv_exactly(c, len(SERVER_FRAME), buf) == SERVER_FRAME
    conn.send(b"more")
    assert recv_exactly(c, 4, buf) == b"more"
    c.sendall(CLIENT_FRAME)
    assert conn.read_exactly(len(CLIENT_FRAME)) == CLIENT_FRAME


def test_early_bytes_after_declined_upgrade_are_the_next_request(make_proxy, raw_upstream, client):
    """Rule 2: "the client connection stays HTTP: what the client sends next is parsed as a
    new request and routed like any other, never passed on raw." (the next request was
    pipelined behind the upgrade request, in the same write)"""
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request() + request(target=b"/next"))
    first = up.accept(0)
    first.read_head()
    nothing_more_upstream(proxy, first)
    first.send(ok_response(b"declined"))
    status, _, body, buf = read_response(c)
    assert (status, body) == (200, b"declined")
    second = up.accept(1)
    head = second.read_head()
    assert head.startswith(b"GET /next HTTP/1.1\r\n")
    assert values(head, b"via")  # it went through the proxy's request path
    second.send(ok_response(b"next"))
    status, _, body, _ = read_response(c, buf)
    assert (status, body) == (200, b"next")
    assert upstream_sees_nothing_more(first) == b""


# --- CVEs ------------------------------------------------------------------------------


def test_cve_2018_1002105_failed_upgrade_is_no_tunnel(make_proxy, raw_upstream, client):
    """CVE-2018-1002105 (Kubernetes API server): an upgrade request the backend refused left
    the proxied connection open as a raw tunnel, so follow-up requests reached the backend
    directly with the proxy's credentials, past its checks. Rule 2: "that upstream connection
    is not reused, and the client connection stays HTTP"."""
    up = raw_upstream()
    proxy = make_proxy(config(up.port, route={"path_prefix": "/api"}))
    c = client(proxy)
    c.sendall(ws_request(target=b"/api/exec"))
    backend = up.accept(0)
    backend.read_head()
    backend.send(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        b'Content-Length: 17\r\n\r\n{"kind":"Status"}'
    )
    status, _, body, _ = read_response(c)
    assert (status, body) == (403, b'{"kind":"Status"}')
    # The follow-up is outside every route: the proxy must answer it, not the backend.
    c.sendall(request(target=b"/internal/secrets"))
    status, _, _, _ = read_response(c)
    assert status == 404
    assert upstream_sees_nothing_more(backend) == b""
    next_connection_carries_sentinel(proxy.address, up, 1, b"/api/sentinel")


def test_cve_2019_17567_no_tunnel_without_101(make_proxy, raw_upstream, client):
    """CVE-2019-17567 (Apache mod_proxy_wstunnel): the tunnel was set up even when the backend
    did not answer 101. Rule 2: "Any other status is relayed as an ordinary response (its
    `Upgrade` header stripped) ... never passed on raw." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request())
    backend = up.accept(0)
    backend.read_head()
    backend.send(
        b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\nContent-Length: 0\r\n\r\n"
    )
    status, headers, _, buf = read_response(c)
    assert status == 200
    assert b"upgrade" not in headers
    assert not buf
    # The client believes it is tunnelled and speaks WebSocket frames, then half-closes.
    c.sendall(CLIENT_FRAME)
    c.shutdown(socket.SHUT_WR)
    rest, closed = read_to_eof(c)
    assert closed
    assert rest == b"" or rest.startswith(b"HTTP/1.1 400 "), rest
    assert upstream_sees_nothing_more(backend) == b""
    assert len(up.conns) == 1


@pytest.mark.parametrize(
    ("answer", "status", "body", "smuggled"),
    [
        pytest.param(
            ok_response(b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle",
            200,
            b"ok",
            b"smuggle",
            id="response-smuggled-after-200",
        ),
        pytest.param(
            ok_response(b"") + SWITCH_WS + b"TUNNEL-DATA",
            200,
            b"",
            b"TUNNEL-DATA",
            id="101-after-200",
        ),
        pytest.param(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\nTUNNEL-DATA",
            403,
            b"",
            b"TUNNEL-DATA",
            id="raw-bytes-after-403",
        ),
        pytest.param(
            SERVER_FRAME + SWITCH_WS + b"TUNNEL-DATA",
            502,
            None,
            b"Hello",
            id="tunnel-bytes-before-101",
        ),
    ],
)
def test_cve_2024_23326_upstream_bytes_outside_a_101(
    make_proxy, raw_upstream, client, answer, status, body, smuggled
):
    """CVE-2024-23326 (Envoy): bytes an upstream sent after a non-101 response (or before its
    101) were treated as tunnel data. Rule 2: "Any other status is relayed as an ordinary
    response ..., that upstream connection is not reused"; only "bytes behind the upstream's
    101 head" are tunnel data."""
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(ws_request())
    backend = up.accept(0)
    backend.read_head()
    backend.send(answer)
    got_status, _, got_body, buf = read_response(c)
    assert got_status == status
    if body is not None:
        assert got_body == body
    # The next request gets a fresh upstream connection, not the leftovers of the first (or
    # the proxy closes the client connection instead).
    with contextlib.suppress(OSError):
        c.sendall(request(target=b"/next"))
    assert eventually(lambda: len(up.conns) > 1 or readable(c))
    if len(up.conns) > 1:
        fresh = up.accept(1)
        assert fresh.read_head().startswith(b"GET /next HTTP/1.1\r\n")
        fresh.send(ok_response(b"fresh"))
        got_status, _, got_body, _ = read_response(c, buf)  # the very next bytes
        assert (got_status, got_body) == (200, b"fresh")
    else:
        rest, closed = read_to_eof(c)
        assert smuggled not in bytes(buf) + rest
        assert b"101" not in bytes(buf) + rest
        assert closed
    assert upstream_sees_nothing_more(backend) == b""


# --- h2c smuggling (Bishop Fox, 2020) ----------------------------------------------------

H2C_VARIANTS = [
    pytest.param(
        request(
            b"Upgrade: h2c",
            b"Connection: Upgrade, HTTP2-Settings",
            b"HTTP2-Settings: " + H2_SETTINGS,
        ),
        [],
        id="classic-h2csmuggler",
    ),
    pytest.param(
        request(b"Upgrade: h2c", b"HTTP2-Settings: " + H2_SETTINGS),
        [],
        id="upgrade-without-connection",
    ),
    pytest.param(request(b"Connection: upgrade", b"Upgrade: H2C"), [], id="uppercase-h2c"),
    pytest.param(
        ws_request(
            b"HTTP2-Settings: " + H2_SETTINGS,
            connection=b"Upgrade, HTTP2-Settings",
            upgrade=b"websocket, h2c",
        ),
        [b"websocket"],
        id="websocket-and-h2c-proper-handshake",
    ),
    pytest.param(
        request(
            b"Connection: Upgrade, HTTP2-Settings",
            b"Upgrade: websocket, h2c",
            b"HTTP2-Settings: " + H2_SETTINGS,
        ),
        [],
        id="websocket-and-h2c-without-handshake",
    ),
    pytest.param(request(b"HTTP2-Settings: " + H2_SETTINGS), [], id="http2-settings-alone"),
    pytest.param(
        request(b"Connection: HTTP2-Settings", b"HTTP2-Settings: " + H2_SETTINGS),
        [],
        id="http2-settings-nominated",
    ),
]


@pytest.mark.parametrize(("req", "offer"), H2C_VARIANTS)
def test_h2c_smuggling_never_offered_never_tunnelled(make_proxy, raw_upstream, client, req, offer):
    """h2c smuggling (Bishop Fox, 2020): a proxy that forwards `Upgrade: h2c` and relays the
    backend's 101 hands the client an HTTP/2 connection straight to the backend, past every
    proxy rule. Rule 1: "an `Upgrade` header holding only the protocols the route allows";
    rule 3: `HTTP2-Settings` is hop-by-hop; rule 2: "A 101 naming a protocol that was not
    offered, a 101 to a request that offered none ... is a 502." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))  # websocket-only route (the default)
    c = client(proxy)
    c.sendall(req)
    conn = up.accept()
    head = conn.read_head()
    assert b"http2-settings" not in names(head), head
    assert b"h2c" not in [t.lower() for t in elements(head, b"upgrade")], head
    assert b"http2-settings" not in [t.lower() for t in elements(head, b"connection")], head
    if offer:
        assert_offer(head, offer)
    else:
        assert_no_upgrade_offer(head)
    # The backend speaks h2c anyway: the client must get a 502, never an HTTP/2 tunnel.
    conn.send(SWITCH_H2C + H2_SERVER_PREFACE)
    assert_502_and_no_tunnel(c, conn, H2_SERVER_PREFACE)


# --- rule 3: hop-by-hop headers ----------------------------------------------------------


def test_hop_by_hop_removed_on_the_way_up(make_proxy, raw_upstream, client):
    """Rule 3: "On every hop the proxy removes `Connection`, every header named in it,
    `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` ...,
    `HTTP2-Settings`, `Proxy-Authorization` ... and frames bodies itself" """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(
        request(
            b"Connection: keep-alive, X-Secret",
            b"Connection: X-Other",
            b"X-Secret: hush",
            b"x-other: hush",
            b"Keep-Alive: timeout=5, max=100",
            b"Proxy-Connection: keep-alive",
            b"TE: trailers",
            b"Trailer: X-Checksum",
            b"Transfer-Encoding: chunked",
            b"Proxy-Authorization: Basic dXNlcjpwYXNz",
            b"HTTP2-Settings: " + H2_SETTINGS,
            b"X-Keep: yes",
            method=b"POST",
            target=b"/up",
            body=b"5\r\nhello\r\n0\r\n\r\n",
        )
    )
    conn = up.accept()
    head = conn.read_head()
    present = names(head)
    for gone in (
        b"x-secret",
        b"x-other",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"http2-settings",
        b"upgrade",
    ):
        assert gone not in present, (gone, head)
    for token in elements(head, b"connection"):
        assert token.lower() in (b"keep-alive", b"close"), head
    assert values(head, b"x-keep") == [b"yes"]
    assert [v.lower() for v in values(head, b"transfer-encoding")] == [b"chunked"]
    assert read_chunked(conn) == b"hello"
    conn.send(ok_response())
    assert read_response(c)[0] == 200
    next_request_follows(c, conn)  # and no byte after the last chunk


def test_hop_by_hop_removed_on_the_way_down(make_proxy, raw_upstream, client):
    """Rule 3: "On every hop the proxy removes `Connection`, every header named in it,
    `Keep-Alive`, ..., `Trailer`, ..., `Upgrade` ... and `Proxy-Authenticate`" """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(request(target=b"/down"))
    conn = up.accept()
    conn.read_head()
    conn.send(
        b"HTTP/1.1 200 OK\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b'Proxy-Authenticate: Basic realm="x"\r\n'
        b"Connection: X-Foo\r\n"
        b"X-Foo: bar\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c, websocket\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"HTTP2-Settings: " + H2_SETTINGS + b"\r\n"
        b"X-Keep: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    head, buf = read_response_head(c)
    assert status_of(head) == 200
    present = names(head)
    for gone in (
        b"keep-alive",
        b"proxy-authenticate",
        b"x-foo",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"http2-settings",
    ):
        assert gone not in present, (gone, head)
    for token in elements(head, b"connection"):
        assert token.lower() in (b"keep-alive", b"close"), head
    assert values(head, b"x-keep") == [b"yes"]
    assert recv_exactly(c, 2, buf) == b"ok"


def test_connection_cannot_remove_proxy_forwarding_headers(make_proxy, raw_upstream, client):
    """Rule 3: "Headers the client names in `Connection` are removed before the proxy adds its
    own, so `Connection: X-Forwarded-For` cannot remove the proxy's `X-Forwarded-For`." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(
        request(
            b"Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Via",
            b"X-Forwarded-For: 6.6.6.6",
        )
    )
    conn = up.accept()
    head = conn.read_head()
    assert values(head, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(head, b"x-forwarded-proto") == [b"http"]
    assert values(head, b"x-forwarded-host") == [HOST]
    assert values(head, b"via")
    conn.send(ok_response())
    assert read_response(c)[0] == 200


# --- rule 4: forwarding headers ----------------------------------------------------------

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
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    req = (ws_request if upgrade else request)(*CLIENT_FORWARDING)
    head = exchange_head(c, up, req, upgrade)
    assert values(head, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(head, b"x-forwarded-proto") == [b"http"]
    assert values(head, b"x-forwarded-host") == [HOST]
    assert b"1.2.3.4" not in head  # the client's Forwarded claim is gone too
    assert_proxy_via(head)


@pytest.mark.parametrize("upgrade", [False, True], ids=["plain", "upgrade"])
def test_forwarding_headers_appended_for_trusted_peer(make_proxy, raw_upstream, client, upgrade):
    """Rule 4: "... unless the peer is in `trusted_proxies`, in which case the proxy appends to
    them." """
    up = raw_upstream()
    proxy = make_proxy(config(up.port, trusted_proxies=["127.0.0.1/32"]))
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


# --- body framing --------------------------------------------------------------------------


def read_chunked(conn) -> bytes:
    """Decode one chunked body from `conn`; fail on trailer fields."""
    body = bytearray()
    while True:
        while b"\r\n" not in conn.received:
            conn.sock.settimeout(5)
            data = conn.sock.recv(65536)
            if not data:
                raise EOFError(f"closed inside a chunked body: {bytes(conn.received)!r}")
            conn.received += data
        line, _, _ = bytes(conn.received).partition(b"\r\n")
        conn.read_exactly(len(line) + 2)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            assert conn.read_exactly(2) == b"\r\n", "trailer fields sent upstream"
            break
        body += conn.read_exactly(size)
        assert conn.read_exactly(2) == b"\r\n"
    return bytes(body)


def test_chunked_request_body_forwarded(make_proxy, raw_upstream, client):
    """Rule 3: the proxy "frames bodies itself (Content-Length or chunked)" """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(
        request(
            b"Transfer-Encoding: chunked",
            method=b"POST",
            target=b"/upload",
            body=b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        )
    )
    conn = up.accept()
    head = conn.read_head()
    assert [v.lower() for v in values(head, b"transfer-encoding")] == [b"chunked"]
    assert b"content-length" not in names(head)
    assert read_chunked(conn) == b"hello world"
    conn.send(ok_response(b"got it"))
    status, _, body, _ = read_response(c)
    assert (status, body) == (200, b"got it")
    next_request_follows(c, conn)  # and no byte after the last chunk


def test_content_length_request_body_forwarded(make_proxy, raw_upstream, client):
    """Rule 3: the proxy "frames bodies itself (Content-Length or chunked)" """
    up = raw_upstream()
    proxy = make_proxy(config(up.port))
    c = client(proxy)
    c.sendall(
        request(b"Content-Length: 11", method=b"POST", target=b"/upload", body=b"hello world")
    )
    conn = up.accept()
    head = conn.read_head()
    assert values(head, b"content-length") == [b"11"]
    assert b"transfer-encoding" not in names(head)
    assert conn.read_exactly(11) == b"hello world"
    conn.send(ok_response(b"got it"))
    status, _, body, _ = read_response(c)
    assert (status, body) == (200, b"got it")
    next_request_follows(c, conn)  # and no byte after the body


def test_upgrade_request_with_body_then_tunnel(make_proxy, raw_upstream, client):
    """Rules 1-3: an upgrade request with a Content-Length body: the upstream gets exactly the
    head and the body; "Bytes the client sent behind its request head are held ... and reach
    the upstream only after that 101"; then raw bytes flow both ways."""
    up = raw_upstream()
    proxy = make_proxy(config(up.port, route={"upgrade": ["spdy"]}))
    c = client(proxy)
    c.sendall(
        request(
            b"Connection: Upgrade",
            b"Upgrade: SPDY/3.1",
            b"Content-Length: 4",
            method=b"POST",
            target=b"/stream",
            body=b"ping",
        )
        + b"EARLY"
    )
    conn = up.accept()
    head = conn.read_head()
    assert head.startswith(b"POST /stream HTTP/1.1\r\n")
    assert_offer(head, [b"SPDY/3.1"])
    assert values(head, b"content-length") == [b"4"]
    assert conn.read_exactly(4) == b"ping"
    nothing_more_upstream(proxy, conn)  # EARLY waits for the 101
    conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n"
    )
    resp, buf = read_response_head(c)
    assert status_of(resp) == 101
    assert conn.read_exactly(5) == b"EARLY"
    c.sendall(b"up")
    assert conn.read_exactly(2) == b"up"
    conn.send(b"down")
    assert recv_exactly(c, 4, buf) == b"down"


def test_upgrade_with_body_answered_at_once_is_not_a_premature_101(make_proxy, raw_upstream):
    """RFC 9110 §7.8: a server switches only once it has the complete request. An upstream
    that answers 101 the moment it has read the body is right, and must get its tunnel even
    when its 101 reaches the proxy before the proxy has noted the end of the client's body."""

    def switch_after_body(conn: RawConn) -> None:
        while True:
            conn.read_head()
            conn.read_exactly(4)
            conn.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
            conn.send(conn.read_exactly(2))

    up = raw_upstream(switch_after_body)
    proxy = make_proxy(config(up.port, route={"upgrade": ["spdy"]}))
    for _ in range(30):
        with socket.create_connection(proxy.address, timeout=5) as c:
            c.sendall(
                request(
                    b"Connection: Upgrade",
                    b"Upgrade: SPDY/3.1",
                    b"Content-Length: 4",
                    method=b"POST",
                    target=b"/stream",
                    body=b"ping",
                )
            )
            resp, buf = read_response_head(c)
            assert status_of(resp) == 101
            c.sendall(b"ok")
            assert recv_exactly(c, 2, buf) == b"ok"
