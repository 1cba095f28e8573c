"""rules/http2.py: the preface check, a stream's header block as RFC 9113 §8.2-§8.3 and
RFC 8441 judge it, and the flood budgets (contract rule 17)."""

from __future__ import annotations

import pytest

from upgradeproxy.errors import BadRequest, MethodNotAllowed
from upgradeproxy.rules import http2 as rules
from upgradeproxy.rules.headers import get_all

PREFACE = rules.PREFACE
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def _key() -> bytes:
    return KEY


def _get(
    method: bytes = b"GET", path: bytes = b"/a?b=1", **more: bytes
) -> list[tuple[bytes, bytes]]:
    fields = [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"chat.example"),
        (b":path", path),
    ]
    return fields + [(k.replace("_", "-").encode(), v) for k, v in more.items()]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(PREFACE, "h2", id="whole preface"),
        pytest.param(PREFACE + b"\x00\x00\x12\x04", "h2", id="preface and a SETTINGS frame"),
        pytest.param(b"", "more", id="nothing yet"),
        pytest.param(b"PRI * HTTP/2", "more", id="a prefix: wait for the rest"),
        pytest.param(b"GET / HTTP/1.1\r\n", "http1", id="HTTP/1.1 request line"),
        pytest.param(b"P", "more", id="one matching byte"),
        pytest.param(b"POST / HTTP/1.1\r\n", "http1", id="POST differs at its second byte"),
        pytest.param(b"PRI * HTTP/1.1\r\n", "http1", id="PRI method but not the preface"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nXX", "http1", id="wrong tail"),
    ],
)
def test_preface_match(data: bytes, expected: str) -> None:
    assert rules.preface_match(data) == expected


MALFORMED = [
    pytest.param(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"Content-Type", b"x")],
        "upper-case",
        id="upper-case field name",
    ),
    pytest.param(_get(connection=b"keep-alive"), "connection-specific", id="Connection"),
    pytest.param(_get(upgrade=b"websocket"), "connection-specific", id="Upgrade"),
    pytest.param(_get(keep_alive=b"5"), "connection-specific", id="Keep-Alive"),
    pytest.param(_get(proxy_connection=b"close"), "connection-specific", id="Proxy-Connection"),
    pytest.param(_get(transfer_encoding=b"chunked"), "connection-specific", id="Transfer-Encoding"),
    pytest.param(_get(te=b"gzip"), "TE other than trailers", id="TE gzip"),
    pytest.param(_get()[1:], "missing :method", id="missing :method"),
    pytest.param(
        [(b":method", b"GET"), (b":scheme", b"http")],
        "missing :scheme or :path",
        id="missing :path",
    ),
    pytest.param(
        [(b":method", b"GET"), (b":path", b"/")], "missing :scheme or :path", id="missing :scheme"
    ),
    pytest.param([*_get(), (b":status", b"200")], "unknown pseudo-header", id="response :status"),
    pytest.param([(b":status", b"200"), *_get()], "unknown pseudo-header", id="unknown :status"),
    pytest.param(
        [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
        "duplicated",
        id="duplicated :method",
    ),
    pytest.param(
        [(b":method", b"GET"), (b":scheme", b"http"), (b"x", b"1"), (b":path", b"/")],
        "after a regular field",
        id="pseudo-header after a regular one",
    ),
    pytest.param(_get(path=b""), "missing :scheme or :path", id="empty :path"),
    pytest.param(
        [*_get(), (b":protocol", b"websocket")], "other than CONNECT", id=":protocol on GET"
    ),
    pytest.param(_get(x=b"a\r\nb"), "invalid value", id="CR LF in a value"),
    pytest.param(_get(x=b" padded"), "invalid value", id="leading space in a value"),
    pytest.param(_get(host=b"other.example"), "Host differs", id="Host differs from :authority"),
    pytest.param(_get(content_length=b"x1"), "Content-Length", id="invalid Content-Length"),
]


@pytest.mark.parametrize(("fields", "why"), MALFORMED)
def test_malformed_requests_are_400(fields: list[tuple[bytes, bytes]], why: str) -> None:
    """RFC 9113 §8.2.2, §8.3: malformed, so never forwarded (BadRequest is the 400)."""
    with pytest.raises(BadRequest, match=why):
        rules.request_head(fields, True, _key)


def test_connect_without_protocol_is_405() -> None:
    fields = [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]
    with pytest.raises(MethodNotAllowed):
        rules.request_head(fields, False, _key)


def test_te_trailers_is_allowed_and_authority_becomes_host() -> None:
    req = rules.request_head(_get(te=b"trailers", cookie=b"a=1"), True, _key)
    head = req.head
    assert (head.method, head.target, head.http_version) == (b"GET", b"/a?b=1", b"2")
    assert head.headers[0] == (b"host", b"chat.example")
    assert req.protocol is None
    assert not req.has_body


@pytest.mark.parametrize(
    ("end", "more", "framing"),
    [
        pytest.param(True, {}, None, id="no body"),
        pytest.param(False, {}, b"chunked", id="body without length: chunked upstream"),
        pytest.param(False, {"content_length": b"5"}, None, id="body with its length"),
    ],
)
def test_body_framing(end: bool, more: dict[str, bytes], framing: bytes | None) -> None:
    head = rules.request_head(_get(b"POST", **more), end, _key).head
    assert (get_all(head.headers, b"transfer-encoding") or [None])[0] == framing


def test_content_length_without_body_is_malformed() -> None:
    with pytest.raises(BadRequest):
        rules.request_head(_get(b"POST", content_length=b"3"), True, _key)


def test_cookie_crumbs_are_joined() -> None:
    """RFC 9113 §8.2.3: HTTP/1.1 gets one Cookie field."""
    head = rules.request_head([*_get(cookie=b"a=1"), (b"cookie", b"b=2")], True, _key).head
    assert get_all(head.headers, b"cookie") == [b"a=1; b=2"]


def test_extended_connect_becomes_an_http1_upgrade() -> None:
    """RFC 8441 §5 -> rule 17: GET of :path, Host from :authority, Connection/Upgrade, a
    fresh key and version 13, the client's subprotocols and extensions kept."""
    fields = [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"https"),
        (b":authority", b"chat.example"),
        (b":path", b"/ws?room=1"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat, superchat"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
        (b"origin", b"https://chat.example"),
        (b"sec-websocket-key", b"client-made-this-up"),
    ]
    req = rules.request_head(fields, False, _key)
    head = req.head
    assert req.protocol == b"websocket"
    assert (head.method, head.target) == (b"GET", b"/ws?room=1")
    h = head.headers
    assert get_all(h, b"host") == [b"chat.example"]
    assert get_all(h, b"connection") == [b"upgrade"]
    assert get_all(h, b"upgrade") == [b"websocket"]
    assert get_all(h, b"sec-websocket-key") == [KEY]
    assert get_all(h, b"sec-websocket-version") == [b"13"]
    assert get_all(h, b"sec-websocket-protocol") == [b"chat, superchat"]
    assert get_all(h, b"sec-websocket-extensions") == [b"permessage-deflate"]
    assert get_all(h, b"origin") == [b"https://chat.example"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(
            [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a")],
            id="no :path or :scheme",
        ),
        pytest.param(
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"http"),
                (b":path", b"/"),
            ],
            id="no :authority",
        ),
    ],
)
def test_extended_connect_needs_its_pseudo_headers(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequest):
        rules.request_head(fields, False, _key)


def test_tunnel_response_keeps_subprotocol_and_extensions_only() -> None:
    upstream = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", b"x"),
        (b"Sec-WebSocket-Protocol", b"chat"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
    ]
    assert rules.tunnel_response_headers(upstream) == [
        (b"sec-websocket-protocol", b"chat"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
    ]


def test_response_fields_are_lower_case_without_connection_specific_ones() -> None:
    got = rules.response_fields([(b"Content-Type", b"a"), (b"Keep-Alive", b"5"), (b"Via", b"v")])
    assert got == [(b"content-type", b"a"), (b"via", b"v")]


def test_budget_allows_a_burst_then_refills_at_its_rate() -> None:
    budget = rules.Budget(3, 2.0, now=0.0)
    assert [budget.spend(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.spend(0.5)  # one token back after half a second at 2/s
    assert not budget.spend(0.5)
    assert [budget.spend(10.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
