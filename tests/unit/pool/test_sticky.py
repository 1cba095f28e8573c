"""pool/sticky.py: the sticky cookie (read, stripped, set) and the hash keys a request carries."""

from __future__ import annotations

import pytest

from upgradeproxy.config.model import Address, HashKey
from upgradeproxy.pool import sticky

COOKIE = [
    pytest.param([(b"Cookie", b"a=1; upx=tok; b=2")], b"tok", id="middle"),
    pytest.param([(b"cookie", b"upx=tok")], b"tok", id="alone"),
    pytest.param([(b"Cookie", b"a=1"), (b"Cookie", b"upx=t2")], b"t2", id="second-header"),
    pytest.param([(b"Cookie", b"xupx=1; upxx=2")], None, id="similar-names"),
    pytest.param([(b"Cookie", b"upx")], None, id="no-equals"),
    pytest.param([(b"X-Cookie", b"upx=1")], None, id="other-header"),
    pytest.param([(b"Cookie", b"upx=")], b"", id="empty-value"),
]


@pytest.mark.parametrize(("headers", "expected"), COOKIE)
def test_cookie_value(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    assert sticky.cookie(headers, b"upx") == expected


WITHOUT = [
    pytest.param([(b"Cookie", b"a=1; upx=t; b=2")], [(b"Cookie", b"a=1; b=2")], id="middle"),
    pytest.param([(b"Cookie", b"upx=t")], [], id="only-cookie-drops-header"),
    pytest.param([(b"Cookie", b"a=1;b=2")], [(b"Cookie", b"a=1;b=2")], id="untouched-bytes"),
    pytest.param(
        [(b"Host", b"x"), (b"Cookie", b"upx=t; upx=u"), (b"Cookie", b"c=3")],
        [(b"Host", b"x"), (b"Cookie", b"c=3")],
        id="repeated-and-other-header",
    ),
]


@pytest.mark.parametrize(("headers", "expected"), WITHOUT)
def test_without_cookie(headers: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]):
    assert sticky.without_cookie(headers, b"upx") == expected


H = [(b"Host", b"x"), (b"X-User", b" alice "), (b"Cookie", b"sid=s1; t=2")]


KEY_CASES = [
    pytest.param(HashKey("client_ip"), H, b"/", b"10.1.2.3", id="client-ip"),
    pytest.param(HashKey("header", "x-user"), H, b"/", b"alice", id="header"),
    pytest.param(HashKey("header", "x-none"), H, b"/", None, id="header-missing"),
    pytest.param(HashKey("cookie", "sid"), H, b"/", b"s1", id="cookie"),
    pytest.param(HashKey("cookie", "nope"), H, b"/", None, id="cookie-missing"),
    pytest.param(HashKey("query", "room"), H, b"/ws?a=1&room=r%2F9", b"r/9", id="query"),
    pytest.param(HashKey("query", "room"), H, b"/ws?rooms=1", None, id="query-missing"),
    pytest.param(HashKey("query", "room"), H, b"/ws", None, id="no-query"),
    pytest.param(HashKey("query", "room"), H, b"http://h/ws?room=5", b"5", id="absolute-form"),
]


@pytest.mark.parametrize(("spec", "headers", "target", "expected"), KEY_CASES)
def test_balance_key(spec: HashKey, headers, target: bytes, expected: bytes | None) -> None:
    assert sticky.balance_key(spec, headers, target, "10.1.2.3") == expected


def test_server_token_is_stable_opaque_and_distinct() -> None:
    a = Address("10.0.0.1", 9000)
    token = sticky.server_token("chat", a)
    assert token == sticky.server_token("chat", Address("10.0.0.1", 9000))
    assert len(token) == 16
    assert "10.0.0.1" not in token
    assert "9000" not in token
    assert token != sticky.server_token("chat", Address("10.0.0.2", 9000))
    assert token != sticky.server_token("games", a)
    # Pinned: a cookie set before a restart (or by another replica) must still name it.
    assert token == "60f2910014159872"


@pytest.mark.parametrize(
    ("secure", "expected"),
    [
        (False, b"upx=abc; Path=/; HttpOnly; SameSite=Lax"),
        (True, b"upx=abc; Path=/; HttpOnly; SameSite=Lax; Secure"),
    ],
)
def test_set_cookie_header(secure: bool, expected: bytes) -> None:
    assert sticky.set_cookie("upx", "abc", secure=secure) == (b"Set-Cookie", expected)
