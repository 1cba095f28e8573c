"""Header rules as pure functions over h11's header shape, `[(name, value), ...]`.

Names keep the case they arrived with (h11's `raw_items()`); every comparison is on the
lower-cased name. Nothing here does I/O, so every rule is a row in a table test.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Final

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 names Connection and the fields it lists; the rest are hop-by-hop by
# RFC 9112 or by habit, as in Go's httputil.ReverseProxy `hopHeaders`.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",  # non-standard, still sent by libcurl
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",  # RFC 7540 §3.2.1: only meaningful with Upgrade: h2c
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# Removing these because Connection names them would change what the request means (routing,
# body framing); the proxy re-derives framing itself, so only Host needs protecting.
_NEVER_NOMINATED: Final = frozenset({b"host"})

WEBSOCKET: Final = b"websocket"
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# RFC 9110 §5.6.2 token, optionally "/" token for a protocol version (§7.8).
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PROTOCOL_RE: Final = re.compile(_TOKEN + rb"(?:/" + _TOKEN + rb")?")


def get_all(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of `name` (lower-case), in order."""
    return [v for n, v in headers if n.lower() == name]


def comma_list(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated elements of every `name` field, stripped, empties dropped."""
    items: list[bytes] = []
    for value in get_all(headers, name):
        items.extend(p.strip() for p in value.split(b",") if p.strip())
    return items


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Lower-cased option names of every Connection field (RFC 9110 §7.6.1)."""
    return frozenset(t.lower() for t in comma_list(headers, b"connection"))


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop fields, those named in Connection, and any framing header."""
    drop = (HOP_BY_HOP | connection_tokens(headers)) - _NEVER_NOMINATED
    # Framing is re-derived from what h11 parsed, so a nominated or stale one never leaks.
    drop |= {b"content-length", b"transfer-encoding"}
    return [(n, v) for n, v in headers if n.lower() not in drop]


def offered_protocols(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """Protocols the client offers: `Upgrade` counts only if Connection lists `upgrade`."""
    if b"upgrade" not in connection_tokens(headers):
        return []
    return comma_list(headers, b"upgrade")


def protocol_name(token: bytes) -> bytes:
    """`SPDY/3.1` -> `spdy`: the part before the version, lower-cased."""
    return token.split(b"/", 1)[0].lower()


def protocol_matches(token: bytes, allowed: bytes) -> bool:
    """Whether offered `token` fits allow-list entry `allowed` (a bare name allows any version)."""
    token = token.lower()
    if b"/" in allowed:
        return token == allowed
    return protocol_name(token) == allowed


def allowed_protocols(offered: Iterable[bytes], allow: Iterable[bytes]) -> list[bytes]:
    """The offered tokens the route allows, in the client's order, malformed ones dropped."""
    allow = list(allow)
    return [
        t
        for t in offered
        if _PROTOCOL_RE.fullmatch(t) and any(protocol_matches(t, a) for a in allow)
    ]


def websocket_key_problem(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why a WebSocket handshake's key/version fields are malformed (RFC 6455 §4.1), or None."""
    keys = get_all(headers, b"sec-websocket-key")
    versions = get_all(headers, b"sec-websocket-version")
    if len(keys) != 1:
        return "expected exactly one Sec-WebSocket-Key"
    try:
        if len(base64.b64decode(keys[0].strip(), validate=True)) != 16:
            return "Sec-WebSocket-Key must be 16 bytes, base64-encoded"
    except binascii.Error:
        return "Sec-WebSocket-Key is not valid base64"
    if len(versions) != 1 or not versions[0].strip().isdigit():
        return "expected exactly one numeric Sec-WebSocket-Version"
    return None


def is_websocket_attempt(method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """A GET carrying both WebSocket handshake fields: only then is `websocket` offered on."""
    names = {n.lower() for n, _ in headers}
    return method == b"GET" and b"sec-websocket-key" in names and b"sec-websocket-version" in names


def websocket_key(random16: bytes) -> bytes:
    """A Sec-WebSocket-Key from 16 random bytes (RFC 6455 §4.1)."""
    return base64.b64encode(random16)


def websocket_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer `key` with (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _WS_GUID).digest())


def switch_problem(
    sent: Sequence[bytes],
    response_headers: Sequence[tuple[bytes, bytes]],
    ws_key: bytes | None,
) -> str | None:
    """Why a 101 must not be relayed, or None when it names what was sent and proves it."""
    if not sent:
        return "101 to a request that offered no upgrade"
    chosen = comma_list(response_headers, b"upgrade")
    if not chosen:
        return "101 without an Upgrade header"
    sent_lower = [s.lower() for s in sent]
    for token in chosen:
        if not any(
            protocol_matches(token, s) or protocol_matches(s, token.lower()) for s in sent_lower
        ):
            return f"101 switches to {token.decode('latin-1')!r}, which was not offered"
    if any(protocol_name(t) == WEBSOCKET for t in chosen):
        if ws_key is None:
            return "101 to websocket without a key to check"
        accept = get_all(response_headers, b"sec-websocket-accept")
        if len(accept) != 1 or accept[0].strip() != websocket_accept(ws_key):
            return "101 with a wrong Sec-WebSocket-Accept"
    return None


def raw_head_problem(head: bytes) -> str | None:
    """Wire-level faults h11 tolerates but RFC 9112 lets us reject: obs-fold (§5.2)."""
    for line in head.split(b"\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding in a header field"
    return None


def bare_lf_chunk_line(buf: bytes) -> bool:
    """Whether the chunk-size line at the start of `buf` ends in a bare LF (RFC 9112 §7.1
    wants CRLF); `buf` may start with the CRLF that closes the previous chunk's data."""
    if buf.startswith(b"\r\n"):
        buf = buf[2:]
    end = buf.find(b"\n")
    return end >= 0 and buf[end - 1 : end] != b"\r"


# RFC 9112 §6.3 lets a recipient reject a length it cannot represent; nginx stops at 2^63-1.
# An upstream parsing into 64 bits would wrap a longer one and read the rest as new requests.
MAX_CONTENT_LENGTH: Final = 2**63 - 1


def framing_problem(
    headers: Sequence[tuple[bytes, bytes]], http_version: bytes = b"1.1"
) -> str | None:
    """Body framing that is a smuggling vector (RFC 9112 §6.1, §6.3), or None."""
    names = {n.lower() for n, _ in headers}
    if b"transfer-encoding" in names:
        if b"content-length" in names:
            return "both Content-Length and Transfer-Encoding"
        if http_version == b"1.0":
            return "Transfer-Encoding in an HTTP/1.0 request"
    for value in get_all(headers, b"content-length"):
        for part in value.split(b","):
            if part.strip().isdigit() and int(part) > MAX_CONTENT_LENGTH:
                return "Content-Length too large"
    return None


def response_headers(
    headers: Sequence[tuple[bytes, bytes]],
    via: bytes,
    switched_to: Sequence[bytes] = (),
    status: int = 200,
) -> Headers:
    """Upstream response fields for the client: hop-by-hop gone, Via added, Upgrade re-added."""
    content_length = get_all(headers, b"content-length")
    chunked = bool(get_all(headers, b"transfer-encoding"))
    out = strip_hop_by_hop(headers)
    # RFC 9110 §8.6: never on a 1xx or 204; on a 101 a client would eat tunnel bytes with it.
    bodyless = status < 200 or status == 204 or bool(switched_to)
    if content_length and not chunked and not bodyless:
        # Kept for HEAD and 304 answers and to avoid chunking what was sized.
        out.append((b"Content-Length", content_length[0]))
    if switched_to:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", b", ".join(switched_to)))
    out.append((b"Via", via))
    return out


def upgrade_offer(
    method: bytes,
    http_version: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    allow: Sequence[bytes],
) -> tuple[list[bytes], bytes | None]:
    """What to offer upstream and the WebSocket key the answer must prove.

    Raises ValueError for a malformed WebSocket handshake (a 400).
    """
    if http_version == b"1.0":
        return [], None  # RFC 9110 §7.8: Upgrade in an HTTP/1.0 request is ignored.
    # HTTP/2 heads carry Connection/Upgrade only as rules.http2 builds them for an extended
    # CONNECT (a client's own make its request malformed).
    offered = allowed_protocols(offered_protocols(headers), allow)
    if not any(protocol_name(t) == WEBSOCKET for t in offered):
        return offered, None
    if not is_websocket_attempt(method, headers):
        # Not a handshake at all (RFC 6455 §4.1 needs GET, a key and a version): drop it.
        return [t for t in offered if protocol_name(t) != WEBSOCKET], None
    problem = websocket_key_problem(headers)
    if problem is not None:
        raise ValueError(problem)
    return offered, get_all(headers, b"sec-websocket-key")[0].strip()
