"""HTTP/2 requests as plain data (contract rule 17): the connection preface, a stream's header
block checked by RFC 9113 §8.2-§8.3 and turned into the `Head` the HTTP/1.1 path plans, an
extended CONNECT (RFC 8441) turned into the HTTP/1.1 upgrade that goes upstream, and the
budgets that tell a flood from a client.

Pure: the HTTP/2 driver hands header lists here and sends whatever comes back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from upgradeproxy.errors import BadRequest, MethodNotAllowed
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules.plan import Head

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2: Final = b"2"

# RFC 9113 §8.2.2: connection-specific fields make a request malformed (TE is checked apart).
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"upgrade", b"keep-alive", b"proxy-connection", b"transfer-encoding"}
)
# RFC 9113 §8.2.1, what a field name must not contain (0x00-0x20, upper-case letters, 0x7f-0xff,
# and a colon outside pseudo-headers) and what a value must not: NUL, CR or LF anywhere,
# whitespace at either end. Regular expressions: a loop over each field's characters cost
# about 2 us a field, a tenth of a browser's request.
_BAD_NAME: Final = re.compile(rb"[\x00-\x20A-Z:\x7f-\xff]")
_BAD_VALUE: Final = re.compile(rb"[\r\n\0]|\A[ \t]|[ \t]\Z")
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# The header fields an extended CONNECT's client may set for the upstream's handshake; the
# proxy makes the key and version itself (RFC 8441 §5: HTTP/2 has no Sec-WebSocket-Key).
_WS_HANDSHAKE: Final = frozenset({b"sec-websocket-key", b"sec-websocket-version"})

Preface = Literal["h2", "http1", "more"]


def preface_match(buf: bytes) -> Preface:
    """Whether a cleartext client's first bytes are the HTTP/2 preface (prior knowledge), not,
    or still a prefix of it (wait for more, but only while every byte so far matches)."""
    if buf.startswith(PREFACE):
        return "h2"
    if PREFACE.startswith(buf):
        return "more"
    return "http1"


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A stream's request: the head the plan takes, and the protocol of an extended CONNECT."""

    head: Head
    protocol: bytes | None = None  # :protocol of an extended CONNECT (lower-cased)
    has_body: bool = False


def request_head(
    fields: Sequence[tuple[bytes, bytes]], end_stream: bool, new_key: Callable[[], bytes]
) -> StreamRequest:
    """Check a request header block and build its `Head` (names lower-case, Host from
    `:authority`). An extended CONNECT becomes the HTTP/1.1 GET + Upgrade sent upstream, with
    a WebSocket key from `new_key`.

    Raises BadRequest (malformed, RFC 9113 §8.1.1) or MethodNotAllowed (CONNECT without
    `:protocol`).
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        if name.startswith(b":"):
            if regular:
                raise BadRequest(f"pseudo-header {name!r} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise BadRequest(f"unknown pseudo-header {name.decode('latin-1')}")
            if name in pseudo:
                raise BadRequest(f"duplicated pseudo-header {name.decode('latin-1')}")
            pseudo[name] = value
            continue
        if problem := _field_problem(name, value):
            raise BadRequest(problem)
        regular.append((name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise BadRequest("missing :method")
    if method == b"CONNECT":
        return _connect(pseudo, regular, end_stream, new_key)
    if b":protocol" in pseudo:
        raise BadRequest(":protocol on a request other than CONNECT")
    path = pseudo.get(b":path")
    if not path or b":scheme" not in pseudo:
        raise BadRequest("missing :scheme or :path")
    return StreamRequest(_head(method, path, pseudo, regular, end_stream), None, not end_stream)


def _field_problem(name: bytes, value: bytes) -> str | None:
    """Why a regular field makes the request malformed (RFC 9113 §8.2), or None."""
    if not name or _BAD_NAME.search(name):
        if name != name.lower():
            return f"upper-case field name {name.decode('latin-1')!r}"
        return "invalid field name"
    if _BAD_VALUE.search(value):
        return f"invalid value in field {name.decode('latin-1')!r}"
    if name in CONNECTION_SPECIFIC:
        return f"connection-specific field {name.decode('latin-1')!r}"
    if name == b"te" and value.strip().lower() != b"trailers":
        return "TE other than trailers"
    return None


def _head(
    method: bytes,
    target: bytes,
    pseudo: dict[bytes, bytes],
    regular: list[tuple[bytes, bytes]],
    end_stream: bool,
) -> Head:
    """The HTTP/1.1-shaped head: Host from :authority; a body without Content-Length is
    chunked upstream (HTTP/2 frames bodies itself, HTTP/1.1 needs to be told)."""
    fields = list(regular)
    cookies = hdr.get_all(regular, b"cookie")
    if len(cookies) > 1:
        # RFC 9113 §8.2.3: crumbs split for compression are one field again for HTTP/1.1.
        fields = [f for f in fields if f[0] != b"cookie"] + [(b"cookie", b"; ".join(cookies))]
    authority = pseudo.get(b":authority")
    if authority is not None:
        hosts = hdr.get_all(regular, b"host")
        if any(h != authority for h in hosts):
            raise BadRequest("Host differs from :authority")
        fields = [(b"host", authority), *(f for f in fields if f[0] != b"host")]
    lengths = hdr.get_all(regular, b"content-length")
    if not all(v.isdigit() for v in lengths) or len(set(lengths)) > 1:
        raise BadRequest("invalid Content-Length")
    if end_stream and lengths and int(lengths[0]) != 0:
        raise BadRequest("Content-Length on a request without a body")
    if not end_stream and not lengths:
        fields.append((b"transfer-encoding", b"chunked"))
    return Head(method, target, HTTP2, fields)


def _connect(
    pseudo: dict[bytes, bytes],
    regular: list[tuple[bytes, bytes]],
    end_stream: bool,
    new_key: Callable[[], bytes],
) -> StreamRequest:
    protocol = pseudo.get(b":protocol")
    if protocol is None:
        raise MethodNotAllowed("CONNECT is not supported")
    path, authority = pseudo.get(b":path"), pseudo.get(b":authority")
    if not path or b":scheme" not in pseudo or authority is None:
        raise BadRequest("extended CONNECT without :scheme, :path or :authority")
    if end_stream:
        raise BadRequest("extended CONNECT that ends its stream")
    protocol = protocol.lower()
    fields = [f for f in regular if f[0] not in _WS_HANDSHAKE]
    fields += [(b"connection", b"upgrade"), (b"upgrade", protocol)]
    if protocol == hdr.WEBSOCKET:
        fields += [(b"sec-websocket-key", new_key()), (b"sec-websocket-version", b"13")]
    head = _head(b"GET", path, pseudo, fields, end_stream=True)
    return StreamRequest(head, protocol, False)


def tunnel_response_headers(
    upstream: Sequence[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """What a 101's headers give the client's `200` (RFC 8441 §5): the negotiated WebSocket
    subprotocol and extensions."""
    keep = (b"sec-websocket-protocol", b"sec-websocket-extensions")
    return [(n.lower(), v) for n, v in upstream if n.lower() in keep]


def response_fields(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response fields for an HTTP/2 client: lower-case names, nothing connection-specific
    (RFC 9113 §8.2.2; the HTTP/1.1 hop-by-hop set is already gone)."""
    return [(n.lower(), v) for n, v in headers if n.lower() not in CONNECTION_SPECIFIC]


class Budget:
    """A token bucket: `burst` events at once, refilled at `rate` per second. A client that
    spends it faster is flooding (CVE-2023-44487 rapid reset, PING/SETTINGS floods)."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = burst
        self._at = now

    def spend(self, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens at `now`; False when the bucket is empty (a flood)."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True
