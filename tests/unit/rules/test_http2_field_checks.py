"""rules/http2.py, RFC 9113 §8.2.1 character by character: a regular field whose name holds
0x00-0x20, an upper-case letter, 0x7f-0xff or a colon, or whose value holds NUL, CR or LF, or
starts or ends with SP or HTAB, makes the request malformed (a 400, never forwarded); every
other field passes unchanged."""

from __future__ import annotations

import pytest

from upgradeproxy.errors import BadRequest
from upgradeproxy.rules import http2 as rules

_PSEUDO = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]


def _key() -> bytes:
    return b"dGhlIHNhbXBsZSBub25jZQ=="


REFUSED = [
    pytest.param(b"", b"v", "invalid field name", id="empty name"),
    pytest.param(b"X-App", b"v", "upper-case", id="upper-case letter"),
    pytest.param(b"x-App pad", b"v", "upper-case", id="upper-case letter and a space"),
    *(
        pytest.param(
            b"x" + bytes([c]) + b"y", b"v", "invalid field name", id=f"name byte 0x{c:02x}"
        )
        for c in (0x00, 0x01, 0x09, 0x0A, 0x0D, 0x1F, 0x20, 0x3A, 0x7F, 0x80, 0xFF)
    ),
    *(
        pytest.param(b"x", value, "invalid value", id=why)
        for value, why in [
            (b"a\0b", "NUL in a value"),
            (b"a\rb", "CR in a value"),
            (b"a\nb", "LF in a value"),
            (b"\rab", "CR first"),
            (b"ab\n", "LF last"),
            (b" ab", "leading SP"),
            (b"\tab", "leading HTAB"),
            (b"ab ", "trailing SP"),
            (b"ab\t", "trailing HTAB"),
            (b" ", "only SP"),
        ]
    ),
]


@pytest.mark.parametrize(("name", "value", "why"), REFUSED)
def test_malformed_fields_are_refused(name: bytes, value: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        rules.request_head([*_PSEUDO, (name, value)], True, _key)


ACCEPTED = [
    pytest.param(b"x-app", b"", id="empty value"),
    pytest.param(b"x-app", b"a b\tc", id="SP and HTAB inside a value"),
    pytest.param(b"x-app", b"\x01\x7f\x80\xff", id="other control and high bytes in a value"),
    pytest.param(b"x-app", b"a:b", id="colon in a value"),
    pytest.param(b"x_app.1~!#$%&'*+^`|", b"v", id="every token symbol in a name"),
    pytest.param(b"0123456789", b"v", id="digits in a name"),
]


@pytest.mark.parametrize(("name", "value"), ACCEPTED)
def test_valid_fields_pass_unchanged(name: bytes, value: bytes) -> None:
    request = rules.request_head([*_PSEUDO, (name, value)], True, _key)
    assert (name, value) in request.head.headers
