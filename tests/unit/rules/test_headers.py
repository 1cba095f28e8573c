"""Table tests for the pure header rules in `upgradeproxy.rules.headers`.

One row per RFC rule or contract clause (interface.md rules 1-3); each row's id names it.
"""

from __future__ import annotations

import pytest

from upgradeproxy.rules import headers as hdr

# RFC 6455 §1.3's worked example.
RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

WS_HANDSHAKE = [
    (b"Host", b"example.com"),
    (b"Connection", b"Upgrade"),
    (b"Upgrade", b"websocket"),
    (b"Sec-WebSocket-Key", RFC_KEY),
    (b"Sec-WebSocket-Version", b"13"),
]


def without(headers, *names):
    drop = {n.lower() for n in names}
    return [(n, v) for n, v in headers if n.lower() not in drop]


def replaced(headers, name, value):
    return [(n, value if n.lower() == name.lower() else v) for n, v in headers]


# --- small readers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "name", "expected"),
    [
        pytest.param([], b"x", [], id="absent"),
        pytest.param([(b"X-A", b"1"), (b"x-a", b"2"), (b"X-B", b"3")], b"x-a", [b"1", b"2"],
                     id="every-value-in-order-any-case"),
    ],
)
def test_get_all(headers, name, expected):
    assert hdr.get_all(headers, name) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([(b"Upgrade", b"a, b")], [b"a", b"b"], id="comma-split"),
        pytest.param([(b"Upgrade", b" a ,\tb ")], [b"a", b"b"], id="ows-stripped"),
        pytest.param([(b"Upgrade", b"a,,  ,b")], [b"a", b"b"], id="empty-elements-dropped"),
        pytest.param([(b"Upgrade", b"a"), (b"upgrade", b"b, c")], [b"a", b"b", b"c"],
                     id="several-fields-concatenated-rfc9110-5.3"),
        pytest.param([(b"Other", b"a")], [], id="other-field-ignored"),
    ],
)
def test_comma_list(headers, expected):
    assert hdr.comma_list(headers, b"upgrade") == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([], frozenset(), id="none"),
        pytest.param([(b"Connection", b"Upgrade")], {b"upgrade"}, id="lower-cased"),
        pytest.param([(b"connection", b" keep-alive ,  X-Foo ")], {b"keep-alive", b"x-foo"},
                     id="whitespace-and-lowercase-name"),
        pytest.param([(b"Connection", b"close"), (b"CONNECTION", b"X-Bar")], {b"close", b"x-bar"},
                     id="multiple-connection-fields"),
    ],
)
def test_connection_tokens(headers, expected):
    assert hdr.connection_tokens(headers) == expected


# --- rule 3: hop-by-hop ----------------------------------------------------------------


def test_hop_by_hop_set_covers_contract_rule_3():
    """Rule 3 names these fields; every one must be in the hop-by-hop set."""
    for name in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                 b"transfer-encoding", b"upgrade", b"http2-settings", b"proxy-authorization",
                 b"proxy-authenticate"):
        assert name in hdr.HOP_BY_HOP, name


END_TO_END = [
    (b"Host", b"example.com"),
    (b"Cookie", b"a=1"),
    (b"Authorization", b"Bearer t"),
    (b"Origin", b"https://example.com"),
    (b"Sec-WebSocket-Key", RFC_KEY),
    (b"Sec-WebSocket-Protocol", b"chat, superchat"),
]


@pytest.mark.parametrize(
    ("extra", "expected_extra"),
    [
        pytest.param([(b"Connection", b"keep-alive")], [], id="connection"),
        pytest.param([(b"Keep-Alive", b"timeout=5")], [], id="keep-alive"),
        pytest.param([(b"Proxy-Connection", b"keep-alive")], [], id="proxy-connection"),
        pytest.param([(b"TE", b"trailers")], [], id="te"),
        pytest.param([(b"Trailer", b"X-Checksum")], [], id="trailer"),
        pytest.param([(b"Transfer-Encoding", b"chunked")], [], id="transfer-encoding"),
        pytest.param([(b"Content-Length", b"5")], [], id="content-length-reframed"),
        pytest.param([(b"Upgrade", b"websocket")], [], id="upgrade"),
        pytest.param([(b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA")], [], id="http2-settings"),
        pytest.param([(b"Proxy-Authorization", b"Basic Zm9vOmJhcg==")], [],
                     id="proxy-authorization"),
        pytest.param([(b"Proxy-Authenticate", b"Basic")], [], id="proxy-authenticate"),
        pytest.param([(b"kEeP-aLiVe", b"x"), (b"UPGRADE", b"h2c")], [],
                     id="names-case-insensitive"),
        pytest.param([(b"Connection", b"X-Secret"), (b"X-Secret", b"s")], [],
                     id="connection-nominated-rfc9110-7.6.1"),
        pytest.param([(b"Connection", b"x-secret"), (b"X-SECRET", b"s")], [],
                     id="nominated-case-insensitive"),
        pytest.param([(b"Connection", b"  keep-alive ,X-A ,  X-B  "), (b"X-A", b"1"),
                      (b"X-B", b"2")], [], id="nominated-with-whitespace"),
        pytest.param([(b"Connection", b"X-A"), (b"X-A", b"1"), (b"Connection", b"X-B"),
                      (b"X-B", b"2")], [], id="nominated-across-multiple-connection-fields"),
        pytest.param([(b"Connection", b"X-A"), (b"X-A", b"1"), (b"X-A", b"2")], [],
                     id="nominated-every-occurrence"),
        pytest.param([(b"Connection", b"Host")], [], id="host-never-removed-by-nomination"),
        pytest.param([(b"X-Custom", b"kept")], [(b"X-Custom", b"kept")], id="end-to-end-kept"),
    ],
)
def test_strip_hop_by_hop(extra, expected_extra):
    """Rule 3: Connection, every header named in it and the fixed hop-by-hop set go; others stay
    in order with their original name case and value."""
    assert hdr.strip_hop_by_hop(END_TO_END + extra) == END_TO_END + expected_extra


# --- rule 1: what is an offer ----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")], [b"websocket"],
                     id="plain-offer"),
        pytest.param([(b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket")], [b"WebSocket"],
                     id="client-spelling-kept"),
        pytest.param([(b"Upgrade", b"websocket")], [], id="upgrade-without-connection-not-offer"),
        pytest.param([(b"Connection", b"keep-alive"), (b"Upgrade", b"websocket")], [],
                     id="connection-without-upgrade-token-not-offer"),
        pytest.param([(b"Connection", b"upgrade")], [], id="connection-upgrade-without-upgrade"),
        pytest.param([(b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"h2c, websocket")],
                     [b"h2c", b"websocket"], id="token-in-list-client-order"),
        pytest.param([(b"Connection", b"keep-alive"), (b"Connection", b"UPGRADE"),
                      (b"Upgrade", b"websocket")], [b"websocket"],
                     id="upgrade-token-in-second-connection-field"),
        pytest.param([(b"Connection", b"upgrade"), (b"Upgrade", b"SPDY/3.1"),
                      (b"Upgrade", b"websocket")], [b"SPDY/3.1", b"websocket"],
                     id="several-upgrade-fields"),
        pytest.param([(b"Connection", b"upgrade-insecure"), (b"Upgrade", b"websocket")], [],
                     id="token-must-match-exactly"),
    ],
)
def test_offered_protocols(headers, expected):
    assert hdr.offered_protocols(headers) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        pytest.param(b"websocket", b"websocket", id="bare"),
        pytest.param(b"SPDY/3.1", b"spdy", id="versioned-lowercased"),
        pytest.param(b"HTTP/2.0", b"http", id="http-version"),
    ],
)
def test_protocol_name(token, expected):
    assert hdr.protocol_name(token) == expected


@pytest.mark.parametrize(
    ("token", "allowed", "expected"),
    [
        pytest.param(b"websocket", b"websocket", True, id="same"),
        pytest.param(b"WebSocket", b"websocket", True, id="case-insensitive"),
        pytest.param(b"SPDY/3.1", b"spdy", True, id="bare-allows-any-version"),
        pytest.param(b"spdy/3.1", b"spdy/3.1", True, id="versioned-exact"),
        pytest.param(b"SPDY/3.1", b"spdy/3.1", True, id="versioned-exact-case-insensitive"),
        pytest.param(b"SPDY/3", b"spdy/3.1", False, id="versioned-other-version"),
        pytest.param(b"SPDY", b"spdy/3.1", False, id="versioned-entry-needs-version"),
        pytest.param(b"h2c", b"websocket", False, id="other-protocol"),
        pytest.param(b"websocketx", b"websocket", False, id="prefix-not-enough"),
    ],
)
def test_protocol_matches(token, allowed, expected):
    assert hdr.protocol_matches(token, allowed) is expected


@pytest.mark.parametrize(
    ("offered", "allow", "expected"),
    [
        pytest.param([b"websocket"], [b"websocket"], [b"websocket"], id="allowed"),
        pytest.param([b"h2c"], [b"websocket"], [], id="not-allowed-stripped"),
        pytest.param([b"websocket"], [], [], id="empty-allow-list-strips-everything"),
        pytest.param([b"WebSocket"], [b"websocket"], [b"WebSocket"],
                     id="case-insensitive-client-spelling-kept"),
        pytest.param([b"SPDY/3.1"], [b"spdy"], [b"SPDY/3.1"], id="bare-name-allows-version"),
        pytest.param([b"SPDY/3.1"], [b"websocket"], [], id="versioned-token-not-allowed"),
        pytest.param([b"SPDY/3.1"], [b"spdy/3.1"], [b"SPDY/3.1"], id="versioned-entry-exact"),
        pytest.param([b"SPDY/3"], [b"spdy/3.1"], [], id="versioned-entry-other-version"),
        pytest.param([b"spdy/3.1", b"h2c", b"websocket", b"SPDY/2"], [b"websocket", b"spdy"],
                     [b"spdy/3.1", b"websocket", b"SPDY/2"], id="client-order-kept"),
        pytest.param([b"web socket", b"websocket/", b"/1", b"a/b/c", b"web\"socket"],
                     [b"websocket", b"web", b"a"], [], id="malformed-tokens-dropped"),
    ],
)
def test_allowed_protocols(offered, allow, expected):
    """Rule 1: only the protocols the route allows, in the client's order."""
    assert hdr.allowed_protocols(offered, allow) == expected


# --- WebSocket handshake (RFC 6455 §4) -------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        pytest.param(WS_HANDSHAKE, False, id="valid"),
        pytest.param(without(WS_HANDSHAKE, b"sec-websocket-key"), True, id="missing-key"),
        pytest.param([*WS_HANDSHAKE, (b"Sec-WebSocket-Key", RFC_KEY)], True, id="two-keys"),
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-key", b"not base64!!"), True,
                     id="key-not-base64"),
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-key", b"AAAAAAAAAAAAAAAAAAAA"), True,
                     id="key-15-bytes"),
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-key", b"AAAAAAAAAAAAAAAAAAAAAAAA"),
                     True, id="key-18-bytes"),
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ"),
                     True, id="key-missing-padding"),
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-key", b""), True, id="key-empty"),
        pytest.param(without(WS_HANDSHAKE, b"sec-websocket-version"), True,
                     id="missing-version"),
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-version", b"thirteen"), True,
                     id="version-not-numeric"),
        pytest.param([*WS_HANDSHAKE, (b"Sec-WebSocket-Version", b"13")], True,
                     id="two-versions"),
        pytest.param([(n.upper(), v) for n, v in WS_HANDSHAKE], False, id="names-any-case"),
    ],
)
def test_websocket_key_problem(headers, problem):
    result = hdr.websocket_key_problem(headers)
    if problem:
        assert isinstance(result, str)
        assert result
    else:
        assert result is None


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        pytest.param(b"GET", WS_HANDSHAKE, True, id="get-with-key-and-version"),
        pytest.param(b"POST", WS_HANDSHAKE, False, id="post"),
        pytest.param(b"get", WS_HANDSHAKE, False, id="method-case-sensitive-rfc9110-9.1"),
        pytest.param(b"GET", without(WS_HANDSHAKE, b"sec-websocket-key"), False, id="no-key"),
        pytest.param(b"GET", without(WS_HANDSHAKE, b"sec-websocket-version"), False,
                     id="no-version"),
    ],
)
def test_is_websocket_attempt(method, headers, expected):
    assert hdr.is_websocket_attempt(method, headers) is expected


@pytest.mark.parametrize(
    ("key", "accept"),
    [
        pytest.param(RFC_KEY, RFC_ACCEPT, id="rfc6455-1.3-example"),
        pytest.param(b" " + RFC_KEY + b" ", RFC_ACCEPT, id="surrounding-ows-ignored"),
    ],
)
def test_websocket_accept(key, accept):
    assert hdr.websocket_accept(key) == accept


# --- rule 2: is this 101 a real switch? ------------------------------------------------

WS_101 = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
          (b"Sec-WebSocket-Accept", RFC_ACCEPT)]


@pytest.mark.parametrize(
    ("sent", "response", "key", "ok"),
    [
        pytest.param([b"websocket"], WS_101, RFC_KEY, True, id="websocket-right-accept"),
        pytest.param([b"websocket"], replaced(WS_101, b"upgrade", b"WebSocket"), RFC_KEY, True,
                     id="answer-case-variant"),
        pytest.param([b"WebSocket"], WS_101, RFC_KEY, True, id="offer-case-variant"),
        pytest.param([b"websocket"], [(n.lower(), v) for n, v in WS_101], RFC_KEY, True,
                     id="lowercase-field-names"),
        pytest.param([b"websocket"], replaced(WS_101, b"upgrade", b"h2c"), RFC_KEY, False,
                     id="protocol-not-offered"),
        pytest.param([b"websocket"], replaced(WS_101, b"upgrade", b"websocket, h2c"), RFC_KEY,
                     False, id="one-of-several-not-offered"),
        pytest.param([], WS_101, RFC_KEY, False, id="none-offered"),
        pytest.param([], WS_101, None, False, id="none-offered-no-key"),
        pytest.param([b"websocket"], without(WS_101, b"upgrade"), RFC_KEY, False,
                     id="missing-upgrade"),
        pytest.param([b"websocket"], replaced(WS_101, b"upgrade", b""), RFC_KEY, False,
                     id="empty-upgrade"),
        pytest.param([b"websocket"], replaced(WS_101, b"sec-websocket-accept", b"AAAA"),
                     RFC_KEY, False, id="wrong-accept"),
        pytest.param([b"websocket"], replaced(WS_101, b"sec-websocket-accept",
                                              RFC_ACCEPT.lower()), RFC_KEY, False,
                     id="accept-is-case-sensitive"),
        pytest.param([b"websocket"], without(WS_101, b"sec-websocket-accept"), RFC_KEY, False,
                     id="missing-accept"),
        pytest.param([b"websocket"], [*WS_101, (b"Sec-WebSocket-Accept", RFC_ACCEPT)], RFC_KEY,
                     False, id="two-accepts"),
        pytest.param([b"websocket"], WS_101, None, False, id="websocket-without-key-to-check"),
        pytest.param([b"websocket"], WS_101, b"x3JJHMbDL1EzLkh9GBhXDw==", False,
                     id="accept-for-another-key"),
        pytest.param([b"SPDY/3.1"], [(b"Upgrade", b"SPDY/3.1")], None, True,
                     id="versioned-same"),
        pytest.param([b"SPDY/3.1"], [(b"Upgrade", b"spdy/3.1")], None, True,
                     id="versioned-case-variant"),
        pytest.param([b"SPDY/3.1"], [(b"Upgrade", b"SPDY/3")], None, False,
                     id="versioned-other-version"),
        pytest.param([b"SPDY/3.1", b"websocket"], [(b"Upgrade", b"SPDY/3.1")], RFC_KEY, True,
                     id="picks-one-of-several-no-accept-needed"),
        pytest.param([b"websocket"], [(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade")],
                     RFC_KEY, False, id="h2c-smuggling-answer"),
    ],
)
def test_switch_problem(sent, response, key, ok):
    """Rule 2: relay a 101 only if it names a protocol sent (and proves the WebSocket key)."""
    result = hdr.switch_problem(sent, response, key)
    if ok:
        assert result is None
    else:
        assert isinstance(result, str)
        assert result


# --- rule 7 helpers: what h11 lets through ---------------------------------------------


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1", False, id="clean"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2", True, id="obs-fold-space"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2", True, id="obs-fold-tab"),
        pytest.param(b"GET / HTTP/1.1\r\n Host: a", True, id="first-field-folded"),
        pytest.param(b"GET / HTTP/1.1\nHost: a\n X: 2", True, id="obs-fold-bare-lf"),
        pytest.param(b"GET / HTTP/1.1\r\nX-A: a b\tc", False, id="inner-whitespace-fine"),
    ],
)
def test_raw_head_problem(head, problem):
    result = hdr.raw_head_problem(head)
    assert (result is not None) is problem


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        pytest.param([(b"Content-Length", b"5")], False, id="content-length-only"),
        pytest.param([(b"Transfer-Encoding", b"chunked")], False, id="chunked-only"),
        pytest.param([], False, id="neither"),
        pytest.param([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], True,
                     id="both-rfc9112-6.1"),
        pytest.param([(b"transfer-encoding", b"chunked"), (b"CONTENT-LENGTH", b"0")], True,
                     id="both-any-case"),
    ],
)
def test_framing_problem(headers, problem):
    result = hdr.framing_problem(headers)
    assert (result is not None) is problem


# --- rules 2, 3: the response the client sees ------------------------------------------

VIA = b"1.1 upgradeproxy"


@pytest.mark.parametrize(
    ("upstream", "switched_to", "expected"),
    [
        pytest.param([(b"Content-Type", b"text/plain"), (b"Content-Length", b"2")], (),
                     [(b"Content-Type", b"text/plain"), (b"Content-Length", b"2"), (b"Via", VIA)],
                     id="content-length-kept-via-appended"),
        pytest.param([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"2")], (),
                     [(b"Via", VIA)], id="chunked-wins-over-content-length"),
        pytest.param([(b"Keep-Alive", b"timeout=5"), (b"Proxy-Authenticate", b"Basic"),
                      (b"Trailer", b"X-T"), (b"Proxy-Connection", b"keep-alive"),
                      (b"X-E", b"e")], (), [(b"X-E", b"e"), (b"Via", VIA)],
                     id="hop-by-hop-removed"),
        pytest.param([(b"Connection", b"X-Foo"), (b"X-Foo", b"bar"), (b"X-E", b"e")], (),
                     [(b"X-E", b"e"), (b"Via", VIA)], id="connection-nominated-removed"),
        pytest.param([(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"X-E", b"e")], (),
                     [(b"X-E", b"e"), (b"Via", VIA)], id="upgrade-on-non-101-stripped"),
        pytest.param([(b"Via", b"1.1 origin"), (b"X-E", b"e")], (),
                     [(b"Via", b"1.1 origin"), (b"X-E", b"e"), (b"Via", VIA)],
                     id="via-appended-after-upstream-via"),
        pytest.param([*WS_101, (b"Sec-WebSocket-Protocol", b"chat")], (b"websocket",),
                     [(b"Sec-WebSocket-Accept", RFC_ACCEPT), (b"Sec-WebSocket-Protocol", b"chat"),
                      (b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Via", VIA)],
                     id="switch-re-adds-connection-and-upgrade"),
    ],
)
def test_response_headers(upstream, switched_to, expected):
    assert hdr.response_headers(upstream, VIA, switched_to) == expected


# --- rule 1: what goes upstream --------------------------------------------------------

WS = [b"websocket"]


@pytest.mark.parametrize(
    ("method", "version", "headers", "allow", "expected"),
    [
        pytest.param(b"GET", b"1.1", WS_HANDSHAKE, WS, ([b"websocket"], RFC_KEY),
                     id="websocket-handshake"),
        pytest.param(b"GET", b"1.0", WS_HANDSHAKE, WS, ([], None),
                     id="http-1.0-upgrade-ignored-rfc9110-7.8"),
        pytest.param(b"POST", b"1.1", WS_HANDSHAKE, WS, ([], None), id="post-websocket-dropped"),
        pytest.param(b"POST", b"1.1", replaced(WS_HANDSHAKE, b"upgrade", b"websocket, spdy/3.1"),
                     [b"websocket", b"spdy"], ([b"spdy/3.1"], None),
                     id="post-drops-only-websocket"),
        pytest.param(b"GET", b"1.1", without(WS_HANDSHAKE, b"sec-websocket-key"), WS, ([], None),
                     id="get-without-key-not-offered"),
        pytest.param(b"GET", b"1.1", without(WS_HANDSHAKE, b"sec-websocket-version"), WS,
                     ([], None), id="get-without-version-not-offered"),
        pytest.param(b"GET", b"1.1", without(WS_HANDSHAKE, b"connection"), WS, ([], None),
                     id="upgrade-without-connection-not-offered"),
        pytest.param(b"GET", b"1.1", WS_HANDSHAKE, [], ([], None), id="route-allows-none"),
        pytest.param(b"GET", b"1.1", replaced(WS_HANDSHAKE, b"upgrade", b"h2c, WebSocket"), WS,
                     ([b"WebSocket"], RFC_KEY), id="h2c-stripped-websocket-kept"),
        pytest.param(b"GET", b"1.1", replaced(WS_HANDSHAKE, b"upgrade", b"SPDY/3.1"), [b"spdy"],
                     ([b"SPDY/3.1"], None), id="versioned-no-key-needed"),
        pytest.param(b"GET", b"1.1", replaced(WS_HANDSHAKE, b"sec-websocket-key",
                                              b" " + RFC_KEY + b" "), WS,
                     ([b"websocket"], RFC_KEY), id="key-returned-stripped"),
    ],
)
def test_upgrade_offer(method, version, headers, allow, expected):
    assert hdr.upgrade_offer(method, version, headers, allow) == expected


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-key", b"short"), id="bad-key"),
        pytest.param([*WS_HANDSHAKE, (b"Sec-WebSocket-Key", RFC_KEY)], id="two-keys"),
        pytest.param(replaced(WS_HANDSHAKE, b"sec-websocket-version", b"x"), id="bad-version"),
    ],
)
def test_upgrade_offer_malformed_websocket_is_value_error(headers):
    """Rule 1: a malformed WebSocket handshake is a 400 (ValueError here)."""
    with pytest.raises(ValueError, match=r"."):
        hdr.upgrade_offer(b"GET", b"1.1", headers, WS)


@pytest.mark.parametrize(
    ("buf", "bare"),
    [
        pytest.param(b"5\r\nhello", False, id="crlf"),
        pytest.param(b"5\nhello", True, id="bare-lf"),
        pytest.param(b"\r\n5\nhello", True, id="bare-lf-after-previous-chunk"),
        pytest.param(b"\r\n0\r\n\r\n", False, id="last-chunk-crlf"),
        pytest.param(b"5", False, id="incomplete-line"),
        pytest.param(b"\n", True, id="lone-lf"),
    ],
)
def test_bare_lf_chunk_line(buf: bytes, bare: bool) -> None:
    """RFC 9112 §7.1: a chunk-size line ends in CRLF; h11 would wait forever on a bare LF."""
    assert hdr.bare_lf_chunk_line(buf) is bare


@pytest.mark.parametrize(
    ("headers", "version", "problem"),
    [
        pytest.param([(b"Content-Length", b"9223372036854775807")], b"1.1", None, id="cl-max"),
        pytest.param(
            [(b"Content-Length", b"9223372036854775808")], b"1.1", "Content-Length too large",
            id="cl-over-2^63",
        ),
        pytest.param(
            [(b"Transfer-Encoding", b"chunked")], b"1.0",
            "Transfer-Encoding in an HTTP/1.0 request", id="te-in-1.0",
        ),
        pytest.param([(b"Transfer-Encoding", b"chunked")], b"1.1", None, id="te-in-1.1"),
    ],
)
def test_framing_problem_lengths_and_versions(headers, version, problem) -> None:
    """RFC 9112 §6.1 (TE in HTTP/1.0 is faulty framing) and §6.3 (an unrepresentable length)."""
    assert hdr.framing_problem(headers, version) == problem


@pytest.mark.parametrize("status", [100, 101, 103, 204])
def test_response_headers_drop_content_length_where_no_body_can_be(status: int) -> None:
    """RFC 9110 §8.6: no Content-Length on a 1xx or a 204 (a 101's would eat tunnel bytes)."""
    out = hdr.response_headers([(b"Content-Length", b"5")], b"1.1 upgradeproxy", status=status)
    assert not hdr.get_all(out, b"content-length")
