"""Table tests for `upgradeproxy.rules.routing`: host normalisation, matching, targets."""

from __future__ import annotations

import pytest

from upgradeproxy.config.model import Route
from upgradeproxy.rules.routing import (
    Router,
    host_matches,
    normalize_host,
    path_matches,
    split_target,
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"example.com", "example.com", id="bytes"),
        pytest.param("example.com", "example.com", id="str"),
        pytest.param(b"Example.COM", "example.com", id="case-folded-rfc9110-4.2.3"),
        pytest.param(b"example.com:8080", "example.com", id="port-dropped"),
        pytest.param(b"example.com.", "example.com", id="trailing-dot-dropped"),
        pytest.param(b"example.com.:80", "example.com", id="trailing-dot-and-port"),
        pytest.param(b" example.com ", "example.com", id="ows-stripped"),
        pytest.param(b"[::1]:8080", "::1", id="ipv6-literal-with-port"),
        pytest.param(b"[2001:DB8::1]", "2001:db8::1", id="ipv6-literal-lowercased"),
        pytest.param(b"[::1", None, id="unterminated-ipv6-literal"),
        pytest.param(b"127.0.0.1:80", "127.0.0.1", id="ipv4-with-port"),
    ],
)
def test_normalize_host(host, expected):
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        pytest.param(None, "anything.example", True, id="no-pattern-matches-any"),
        pytest.param(None, None, True, id="no-pattern-matches-no-host"),
        pytest.param("example.com", None, False, id="pattern-needs-host"),
        pytest.param("example.com", "example.com", True, id="exact"),
        pytest.param("example.com", "www.example.com", False, id="exact-not-subdomain"),
        pytest.param("*.example.com", "a.example.com", True, id="wildcard-one-label"),
        pytest.param("*.example.com", "a.b.example.com", True, id="wildcard-several-labels"),
        pytest.param("*.example.com", "example.com", False, id="wildcard-not-apex"),
        pytest.param("*.example.com", "badexample.com", False, id="wildcard-label-boundary"),
        pytest.param("*.example.com", ".example.com", False, id="wildcard-empty-label"),
        pytest.param("*.example.com", "a.example.org", False, id="wildcard-other-suffix"),
    ],
)
def test_host_matches(pattern, host, expected):
    assert host_matches(pattern, host) is expected


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        pytest.param("/", "/anything", True, id="root"),
        pytest.param("/ws", "/ws", True, id="equal"),
        pytest.param("/ws", "/ws/room", True, id="below"),
        pytest.param("/ws", "/api", False, id="other"),
        pytest.param("/ws/", "/ws", False, id="shorter-than-prefix"),
    ],
)
def test_path_matches(prefix, path, expected):
    assert path_matches(prefix, path) is expected


ROUTES = (
    Route(upstream="chat", host="chat.example.com", path_prefix="/ws"),
    Route(upstream="wild", host="*.example.com", path_prefix="/ws"),
    Route(upstream="chat-any", host="chat.example.com"),
    Route(upstream="api", path_prefix="/api"),
    Route(upstream="api-shadowed", path_prefix="/api/v2"),
)


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        pytest.param("chat.example.com", "/ws/1", "chat", id="first-match"),
        pytest.param("a.example.com", "/ws/1", "wild", id="wildcard-route"),
        pytest.param("chat.example.com", "/other", "chat-any", id="host-only-route"),
        pytest.param("anything", "/api/x", "api", id="any-host-route"),
        pytest.param(None, "/api/x", "api", id="no-host-any-host-route"),
        pytest.param("anything", "/api/v2/x", "api", id="first-match-wins-over-longer-prefix"),
        pytest.param("example.com", "/ws/1", None, id="apex-not-wildcard-no-route"),
        pytest.param("anything", "/nope", None, id="no-route-404"),
    ],
)
def test_router_first_match_wins(host, path, expected):
    route = Router(ROUTES).match(host, path)
    assert (route.upstream if route else None) == expected


HOST = [(b"Host", b"app.example")]


@pytest.mark.parametrize(
    ("method", "target", "headers", "expected"),
    [
        pytest.param(b"GET", b"/a/b?x=1", HOST, (b"app.example", "/a/b", b"/a/b?x=1"),
                     id="origin-form"),
        pytest.param(b"GET", b"/", [(b"host", b" app.example:8080 ")],
                     (b"app.example:8080", "/", b"/"), id="host-trimmed-any-case"),
        pytest.param(b"GET", b"/", [], (None, "/", b"/"), id="no-host"),
        pytest.param(b"GET", b"http://other.example:81/x?y", HOST,
                     (b"other.example:81", "/x", b"/x?y"),
                     id="absolute-form-overrides-host-rfc9112-3.2.2"),
        pytest.param(b"GET", b"HTTPS://other.example/x", HOST, (b"other.example", "/x", b"/x"),
                     id="absolute-form-scheme-any-case"),
        pytest.param(b"GET", b"http://other.example", HOST, (b"other.example", "/", b"/"),
                     id="absolute-form-empty-path"),
        pytest.param(b"GET", b"http://other.example?q=1", HOST,
                     (b"other.example", "/", b"/?q=1"), id="absolute-form-query-only"),
        pytest.param(b"GET", b"http://[::1]:8080/ws", [], (b"[::1]:8080", "/ws", b"/ws"),
                     id="absolute-form-ipv6"),
        pytest.param(b"OPTIONS", b"*", HOST, (b"app.example", "*", b"*"),
                     id="asterisk-form-options"),
        pytest.param(b"GET", b"/", [(b"Host", b"[::1]:8080")], (b"[::1]:8080", "/", b"/"),
                     id="ipv6-host"),
    ],
)
def test_split_target(method, target, headers, expected):
    assert split_target(method, target, headers)[:3] == expected


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        pytest.param(b"GET", b"*", HOST, id="asterisk-only-for-options"),
        pytest.param(b"GET", b"foo", HOST, id="not-origin-or-absolute-form"),
        pytest.param(b"GET", b"ftp://a/b", HOST, id="other-scheme"),
        pytest.param(b"CONNECT", b"app.example:443", HOST, id="authority-form"),
        pytest.param(b"GET", b"/", [*HOST, (b"Host", b"other.example")], id="duplicate-host"),
        pytest.param(b"GET", b"/", HOST + HOST, id="duplicate-identical-host"),
        pytest.param(b"GET", b"/", [(b"Host", b"a b")], id="invalid-host-space"),
        pytest.param(b"GET", b"/", [(b"Host", b"a/b")], id="invalid-host-slash"),
        pytest.param(b"GET", b"/", [(b"Host", b"user@a")], id="invalid-host-userinfo"),
        pytest.param(b"GET", b"/", [(b"Host", b"a:b")], id="invalid-host-port"),
        pytest.param(b"GET", b"http://a b/x", HOST, id="invalid-absolute-authority"),
    ],
)
def test_split_target_rejects(method, target, headers):
    """RFC 9112 §3.2: these are answered with 400 (ValueError here)."""
    with pytest.raises(ValueError, match=r"."):
        split_target(method, target, headers)
