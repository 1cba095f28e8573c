"""Table tests for `upgradeproxy.rules.plan`: a request head in, a plan or the error out."""

from __future__ import annotations

import pytest

from tests.support.configs import config_yaml, route
from upgradeproxy.config.loader import parse_config
from upgradeproxy.errors import (
    BadRequest,
    MethodNotAllowed,
    NoRoute,
    OriginRefused,
    ProxyError,
)
from upgradeproxy.rules.plan import Head, Origin, body_framing, locate, log_fields, plan
from upgradeproxy.rules.routing import Router

CONFIG = parse_config(
    config_yaml(
        {"chat": 9000, "web": 9001},
        [route("chat", host="chat.example.com", path_prefix="/ws"),
         route("web", path_prefix="/plain", upgrade=[]), route("web")],
        trusted_proxies=["10.0.0.0/8"],
    )
)  # fmt: skip
ROUTER = Router(CONFIG.routes)
CLIENT = Origin("192.0.2.7", b"http")
WS = [
    (b"Connection", b"Upgrade"),
    (b"Upgrade", b"websocket"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
]


def head(target: bytes = b"/", headers=(), method: bytes = b"GET", version: bytes = b"1.1"):
    return Head(method, target, version, list(headers))


def make_plan(h: Head, origin: Origin = CLIENT):
    return plan(h, locate(h, ROUTER), origin, CONFIG)


@pytest.mark.parametrize(
    ("h", "route_label", "path", "target"),
    [
        pytest.param(
            head(b"/ws/x?q=1", [(b"Host", b"chat.example.com")]),
            "chat.example.com/ws", "/ws/x", b"/ws/x?q=1", id="host-and-prefix",
        ),
        pytest.param(
            head(b"/ws/x", [(b"Host", b"CHAT.example.com:8080")]),
            "chat.example.com/ws", "/ws/x", b"/ws/x", id="host-case-and-port-ignored",
        ),
        pytest.param(
            head(b"/ws", [(b"Host", b"other.example")]),
            "*/", "/ws", b"/ws", id="other-host-falls-through",
        ),
        pytest.param(
            head(b"http://chat.example.com/ws?a", [(b"Host", b"other.example")]),
            "chat.example.com/ws", "/ws", b"/ws?a", id="absolute-form-authority-wins",
        ),
    ],
)  # fmt: skip
def test_locate_routes_by_host_and_path(h, route_label, path, target):
    located = locate(h, ROUTER)
    assert (located.route_label, located.path, located.target) == (route_label, path, target)


@pytest.mark.parametrize(
    ("h", "error", "status"),
    [
        pytest.param(head(version=b"2.0", headers=[(b"Host", b"x")]), BadRequest, 400, id="http2"),
        pytest.param(
            head(b"x:443", [(b"Host", b"x")], method=b"CONNECT"), MethodNotAllowed, 405,
            id="connect",
        ),
        pytest.param(
            head(headers=[(b"Host", b"x"), (b"Content-Length", b"1"),
                          (b"Transfer-Encoding", b"chunked")]),
            BadRequest, 400, id="cl-and-te",
        ),
        pytest.param(
            head(headers=[(b"Host", b"a"), (b"Host", b"b")]), BadRequest, 400, id="two-hosts"
        ),
        pytest.param(head(b"x", [(b"Host", b"x")]), BadRequest, 400, id="relative-target"),
        pytest.param(
            head(headers=[(b"Host", b"bad host")]), BadRequest, 400, id="invalid-host"
        ),
    ],
)  # fmt: skip
def test_locate_rejects(h, error, status):
    with pytest.raises(error) as caught:
        locate(h, ROUTER)
    assert caught.value.status == status


def test_no_route_is_404():
    router = Router(CONFIG.routes[:1])
    with pytest.raises(NoRoute) as caught:
        locate(head(b"/ws", [(b"Host", b"elsewhere")]), router)
    assert caught.value.status == 404


def test_websocket_offer_goes_upstream_with_its_key():
    p = make_plan(head(b"/ws", [(b"Host", b"chat.example.com"), *WS]))
    assert p.offer == (b"websocket",)
    assert p.ws_key == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert (b"Connection", b"upgrade") in p.headers
    assert (b"Upgrade", b"websocket") in p.headers
    assert p.upstream.name == "chat"
    assert p.body == "none"
    assert not p.needs_host


def test_route_without_upgrades_strips_the_offer():
    p = make_plan(head(b"/plain", [(b"Host", b"h"), *WS]))
    assert p.offer == ()
    assert p.ws_key is None
    names = {n.lower() for n, _ in p.headers}
    assert b"upgrade" not in names
    assert b"sec-websocket-key" in names  # end-to-end headers are unchanged


def test_malformed_websocket_handshake_is_400():
    bad = [(n, b"short") if n == b"Sec-WebSocket-Key" else (n, v) for n, v in WS]
    with pytest.raises(BadRequest, match="WebSocket"):
        make_plan(head(b"/ws", [(b"Host", b"chat.example.com"), *bad]))


def test_absolute_form_replaces_host_header():
    p = make_plan(head(b"http://chat.example.com/ws", [(b"Host", b"evil.example")]))
    hosts = [v for n, v in p.headers if n.lower() == b"host"]
    assert hosts == [b"chat.example.com"]


def test_http10_without_host_needs_one_added():
    p = make_plan(head(b"/", [], version=b"1.0"))
    assert p.needs_host
    assert not [v for n, v in p.headers if n.lower() == b"host"]


@pytest.mark.parametrize(
    ("peer", "sent", "xff"),
    [
        pytest.param("192.0.2.7", b"1.1.1.1", b"192.0.2.7", id="untrusted-replaced"),
        pytest.param("10.1.2.3", b"1.1.1.1", b"1.1.1.1, 10.1.2.3", id="trusted-appended"),
    ],
)
def test_forwarded_for_depends_on_trust(peer, sent, xff):
    h = head(b"/", [(b"Host", b"h"), (b"X-Forwarded-For", sent)])
    p = make_plan(h, Origin(peer, b"https"))
    assert [v for n, v in p.headers if n == b"X-Forwarded-For"] == [xff]
    assert (b"X-Forwarded-Proto", b"https") in p.headers


@pytest.mark.parametrize(
    ("headers", "framing", "body"),
    [
        pytest.param([], [], "none", id="no-body"),
        pytest.param([(b"Content-Length", b"0")], [(b"Content-Length", b"0")], "none", id="cl-0"),
        pytest.param(
            [(b"Content-Length", b"5, 5")], [(b"Content-Length", b"5")], "length", id="cl-list"
        ),
        pytest.param(
            [(b"transfer-ENCODING", b"Chunked")],
            [(b"Transfer-Encoding", b"chunked")], "chunked", id="te-any-case",
        ),
    ],
)  # fmt: skip
def test_body_framing_is_a_value(headers, framing, body):
    assert body_framing(headers) == (framing, body)


def test_log_fields_known_before_any_check():
    h = head(b"/a/b?secret=1", [(b"Host", b"a"), (b"Host", b"b")], method=b"POST")
    assert log_fields(h) == ("POST", "a,b", "/a/b")


def test_every_rejection_is_a_proxy_error():
    for h in (head(version=b"0.9"), head(b"nope", [(b"Host", b"x")])):
        with pytest.raises(ProxyError):
            make_plan(h)


# --- rule 12: allowed_origins --------------------------------------------------------------

ORIGINS = parse_config(
    config_yaml(
        {"app": 9000},
        [route(path_prefix="/ws", allowed_origins=["https://chat.example.com"]),
         route(path_prefix="/none", upgrade=[], allowed_origins=[]), route()],
    )
)  # fmt: skip


def origin_plan(target: bytes, extra: list[tuple[bytes, bytes]], ws: bool = True):
    h = head(target, [(b"Host", b"x"), *(WS if ws else []), *extra])
    return plan(h, locate(h, Router(ORIGINS.routes)), CLIENT, ORIGINS)


@pytest.mark.parametrize(
    ("target", "extra", "ws", "refused"),
    [
        pytest.param(b"/ws", [(b"Origin", b"https://chat.example.com")], True, False, id="allowed"),
        pytest.param(b"/ws", [(b"Origin", b"https://evil.example")], True, True, id="refused"),
        pytest.param(b"/ws", [(b"Origin", b"null")], True, True, id="null"),
        pytest.param(b"/ws", [(b"Origin", b"\x00\xff garbage")], True, True, id="garbage"),
        pytest.param(b"/ws", [], True, False, id="no-origin-not-a-browser"),
        pytest.param(b"/ws", [(b"Origin", b"https://evil.example")], False, False, id="plain-http"),
        pytest.param(b"/none", [(b"Origin", b"https://evil.example")], True, False, id="stripped"),
        pytest.param(b"/", [(b"Origin", b"https://evil.example")], True, False, id="no-list"),
    ],
)
def test_origin_is_checked_only_on_upgrades_that_go_upstream(target, extra, ws, refused):
    if refused:
        with pytest.raises(OriginRefused) as info:
            origin_plan(target, extra, ws)
        assert (info.value.status, info.value.kind) == (403, "origin")
        assert "*/ws" in info.value.detail
    else:
        origin_plan(target, extra, ws)


# --- request ids, client certificates, log extras (issue 11) ------------------------------

from dataclasses import replace  # noqa: E402

from upgradeproxy.rules.plan import log_extras, request_id, request_line, with_request_id  # noqa: E402

TRUSTED = Origin("10.1.2.3", b"http")


def fresh() -> bytes:
    return b"f" * 32


@pytest.mark.parametrize(
    ("headers", "origin", "enabled", "expected"),
    [
        pytest.param([(b"X-Request-ID", b"abc")], TRUSTED, True, b"abc", id="trusted-passes"),
        pytest.param([(b"x-request-id", b"abc")], CLIENT, True, b"f" * 32, id="untrusted-fresh"),
        pytest.param([], TRUSTED, True, b"f" * 32, id="trusted-without-one-fresh"),
        pytest.param([(b"X-Request-ID", b"")], TRUSTED, True, b"f" * 32, id="trusted-empty-fresh"),
        pytest.param([(b"X-Request-ID", b"abc")], TRUSTED, False, None, id="turned-off"),
    ],
)
def test_request_id_decision(headers, origin, enabled, expected) -> None:
    config = replace(CONFIG, request_id=enabled)
    assert request_id(headers, origin, config, fresh) == expected


@pytest.mark.parametrize(
    ("rid", "origin", "expected"),
    [
        pytest.param(b"r1", CLIENT, [(b"X-Request-ID", b"r1")], id="ours-replaces-client-id"),
        pytest.param(None, CLIENT, [(b"X-Request-ID", b"client")], id="off-passes-client-id"),
        pytest.param(
            None, Origin("192.0.2.7", b"https", "CN=alice,O=Example"),
            [(b"X-Request-ID", b"client"), (b"X-Client-Cert-Subject", b"CN=alice,O=Example")],
            id="verified-subject-replaces-client-one",
        ),
    ],
)  # fmt: skip
def test_proxy_owned_headers_upstream(rid, origin, expected) -> None:
    h = head(b"/", [(b"Host", b"a"), (b"X-Request-ID", b"client"),
                    (b"X-Client-Cert-Subject", b"CN=forged")])  # fmt: skip
    sent = plan(h, locate(h, ROUTER), origin, CONFIG, rid).headers
    ours = [(n, v) for n, v in sent if n.lower() in (b"x-request-id", b"x-client-cert-subject")]
    assert ours == expected


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        pytest.param(b"GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", "/a"), id="crlf"),
        pytest.param(b"POST /u HTTP/1.0\n", ("POST", "/u"), id="bare-lf"),
        pytest.param(b"GET /a HTTP/1.1", ("", ""), id="line-not-complete"),
        pytest.param(b"GET  /a HTTP/1.1\r\n", ("", ""), id="two-spaces"),
        pytest.param(b"\x16\x03\x01\x02\x00", ("", ""), id="tls-hello"),
        pytest.param(b"", ("", ""), id="empty"),
    ],
)
def test_request_line_for_the_log(buf: bytes, expected: tuple[str, str]) -> None:
    assert request_line(buf) == expected


def test_log_extras_query_only_when_configured() -> None:
    h = head(b"/ws?token=t", [(b"User-Agent", b"ua/1"), (b"Host", b"a")])
    assert log_extras(h, CONFIG) == (None, "ua/1")
    on = replace(CONFIG, access_log=replace(CONFIG.access_log, query=True))
    assert log_extras(h, on) == ("token=t", "ua/1")
    assert log_extras(head(b"/", []), on) == ("", "")


def test_response_gets_the_request_id_in_place_of_an_upstream_one() -> None:
    headers = [(b"Content-Length", b"0"), (b"x-request-id", b"theirs")]
    assert with_request_id(headers, b"ours") == [
        (b"Content-Length", b"0"),
        (b"X-Request-ID", b"ours"),
    ]
    assert with_request_id(headers, None) == headers
