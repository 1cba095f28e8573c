"""Bytes on the wire, built and parsed by hand: WebSocket handshakes, heads, chunked bodies,
PROXY protocol headers. Pure functions over bytes; no sockets here (see clients.py)."""

from __future__ import annotations

import base64
import hashlib
import socket
import struct

# RFC 6455 §1.3. The tests keep their own copy rather than read the proxy's (it keeps it
# private): an oracle that shares the code under test could not catch a wrong constant.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # the RFC's sample key ...
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # ... and its accept value


def ws_accept(key: bytes | str) -> bytes:
    """The Sec-WebSocket-Accept value for `key` (RFC 6455 §4.2.2)."""
    raw = key.encode() if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw.strip() + WS_GUID).digest())


WS_HEADERS = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"
)


def switching(request_head: bytes = b"", extra: bytes = b"") -> bytes:
    """A correct 101 head answering the WebSocket handshake in `request_head` (or WS_KEY's)."""
    key = header(request_head, b"sec-websocket-key") if request_head else None
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ws_accept(key or WS_KEY) + b"\r\n" + extra + b"\r\n"
    )


SWITCH_WS = switching()  # the 101 for WS_KEY


def ws_request(
    *extra: bytes,
    target: bytes = b"/chat",
    host: bytes = b"app.example",
    method: bytes = b"GET",
    upgrade: bytes | None = b"websocket",
    connection: bytes = b"Upgrade",
    key: bytes = WS_KEY,
    body: bytes = b"",
) -> bytes:
    """An RFC 6455 opening handshake (plus `extra` header lines, without their CRLF); an
    empty `connection` or a None `upgrade` leaves that field out."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host]
    if connection:
        lines.append(b"Connection: " + connection)
    if upgrade is not None:
        lines.append(b"Upgrade: " + upgrade)
    lines += [b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: 13", *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def request(
    *lines: bytes, target: bytes = b"/chat", method: bytes = b"GET", host: bytes = b"app.example",
    body: bytes = b"",
) -> bytes:  # fmt: skip
    """A request head (plus `lines`, without their CRLF) and `body`, as given: no framing added."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: " + host, *lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# A masked client text frame "Hello" (RFC 6455 §5.7) and an unmasked server one.
CLIENT_FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
SERVER_FRAME = b"\x81\x05Hello"
# h2c (RFC 7540 §3.2): the settings a client offers and the first frame a server sends.
H2_SETTINGS = b"AAMAAABkAARAAAAAAAIAAAAA"
H2_SERVER_PREFACE = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame
SWITCH_H2C = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


def ok_response(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """A 200 with a Content-Length (`extra` adds header lines, each ending in CRLF)."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# --- reading heads --------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(start line, [(name, value)]) with names as sent and values stripped."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name, value.strip()))
    return lines[0], fields


def values(head: bytes, name: bytes) -> list[bytes]:
    """Every value of `name` (case-insensitive), in order."""
    return [v for n, v in parse_head(head)[1] if n.strip().lower() == name.lower()]


def header(head: bytes, name: bytes) -> bytes | None:
    """The first value of `name` (case-insensitive), or None."""
    found = values(head, name)
    return found[0] if found else None


def elements(head: bytes, name: bytes) -> list[bytes]:
    """The comma-separated elements of every `name` field."""
    return [e.strip() for v in values(head, name) for e in v.split(b",") if e.strip()]


def names(head: bytes) -> set[bytes]:
    """The lower-cased field names of a head."""
    return {n.strip().lower() for n, _ in parse_head(head)[1]}


def assert_no_upgrade_offer(head: bytes) -> None:
    """A plain request upstream: no Upgrade, no `upgrade` in Connection, no HTTP2-Settings."""
    assert b"upgrade" not in names(head), head
    assert b"http2-settings" not in names(head), head
    assert b"upgrade" not in [t.lower() for t in elements(head, b"connection")], head


def assert_offer(head: bytes, protocols: list[bytes]) -> None:
    """An upgrade offer upstream: `Connection: upgrade` alone, and exactly `protocols`."""
    assert [t.lower() for t in elements(head, b"connection")] == [b"upgrade"], head
    assert elements(head, b"upgrade") == protocols, head


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def head_fields(head: bytes) -> dict[bytes, bytes]:
    """Lower-cased name -> value (the last one wins) of a head."""
    return {n.strip().lower(): v for n, v in parse_head(head)[1] if n}


def split_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """(status, lower-cased headers, everything after the head) of a whole response."""
    head, _, body = data.partition(b"\r\n\r\n")
    return status_of(head), head_fields(head + b"\r\n\r\n"), body


# --- bodies -----------------------------------------------------------------------------


def chunked(*pieces: bytes) -> bytes:
    """`pieces` as a chunked body, with the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def decode_chunks(data: bytes) -> tuple[bytes, bool]:
    """(payload, saw the terminating 0-chunk) from possibly truncated chunked bytes."""
    payload = b""
    while data:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            break
        size = int(data[:line_end].split(b";")[0], 16)
        if size == 0:
            return payload, True
        chunk = data[line_end + 2 : line_end + 2 + size]
        payload += chunk
        if len(chunk) < size:
            break
        data = data[line_end + 2 + size + 2 :]
    return payload, False


def assert_short_error(body: bytes) -> None:
    """Rule 7: a short text body, never a traceback."""
    assert len(body) < 256, body
    assert b"Traceback" not in body, body
    assert b'File "' not in body, body
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise AssertionError(f"error body is not text: {body!r}") from None


# --- PROXY protocol -------------------------------------------------------------------------

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY protocol v1 line for TCP over IPv4."""
    return b"PROXY TCP4 %s %s %d %d\r\n" % (
        source[0].encode(), destination[0].encode(), source[1], destination[1]
    )  # fmt: skip


def proxy_v2_header(
    source: str | tuple[str, int], port: int = 443, destination: str = "127.0.0.1"
) -> bytes:
    """A PROXY protocol v2 header: PROXY command, TCP over IPv4, `source` -> `destination`.

    `source` is an address (port 40000) or (address, port); `port` is the destination port.
    """
    src, sport = (source, 40000) if isinstance(source, str) else source
    addresses = socket.inet_aton(src) + socket.inet_aton(destination)
    return (
        PROXY_V2_SIGNATURE
        + bytes([0x21, 0x11])
        + struct.pack("!H", 12)
        + addresses
        + struct.pack("!HH", sport, port)
    )
