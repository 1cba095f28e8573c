"""Bytes on the wire shared by the bench upstream and the load generators.

Everything is prebuilt once: the point of the bench clients and upstream is to spend as little
CPU per operation as possible, so that the proxy under test is the bottleneck, not them.
"""

from __future__ import annotations

import os
import struct
from typing import Final

import repo_path  # noqa: F401  (before tests.support: puts the repository on sys.path)

from tests.support.wire import WS_KEY, ws_accept

# WS_KEY is fixed: the client then knows the expected Accept in advance and only compares bytes.
HOST: Final = b"bench.local"
MASK: Final = b"\x37\xfa\x21\x3d"
HEAD_END: Final = b"\r\n\r\n"
MAX_HEAD: Final = 16384

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

# Paths the bench upstream understands (see upstream_server.py).
PATH_ECHO: Final = "/echo"  # WebSocket echo of every frame
PATH_HANDSHAKE: Final = "/hs"  # 101, then wait for the peer to close
PATH_SINK: Final = "/sink"  # /sink?n=N: 101, swallow N bytes, answer the count (8 bytes, BE)
PATH_SOURCE: Final = "/source"  # /source?n=N: 101, send N bytes, half-close
PATH_HTTP: Final = "/http"  # plain HTTP, served by the nginx HTTP upstream


accept_for = ws_accept  # the Sec-WebSocket-Accept value for a key (RFC 6455 §4.2.2)


WS_ACCEPT: Final = accept_for(WS_KEY)
# What a client looks for in a 101 head, lower-cased (header names are case-insensitive).
ACCEPT_LINE: Final = b"\r\nsec-websocket-accept: " + WS_ACCEPT.lower() + b"\r\n"


def handshake_request(path: str, key: bytes = WS_KEY) -> bytes:
    """A complete WebSocket opening handshake for `path`."""
    return (
        f"GET {path} HTTP/1.1\r\n".encode()
        + b"Host: "
        + HOST
        + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def switching_response(key: bytes) -> bytes:
    """The upstream's 101 answer to a handshake carrying `key`."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
    )


def head_ok(head: bytes) -> bool:
    """True if `head` (through the blank line) is a 101 proving our key."""
    return head.startswith(b"HTTP/1.1 101 ") and ACCEPT_LINE in head.lower()


def _frame_header(opcode: int, length: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, bit | length)
    if length < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, bit | 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, bit | 127, length)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` (an involution: masks and unmasks)."""
    if not payload:
        return payload
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = OP_BINARY, mask: bytes = MASK) -> bytes:
    """A final, masked frame as a client must send it."""
    return _frame_header(opcode, len(payload), True) + mask + unmask(payload, mask)


def server_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """A final, unmasked frame as a server sends it."""
    return _frame_header(opcode, len(payload), False) + payload


def frame_size(payload_size: int, *, masked: bool) -> int:
    """Bytes on the wire of one frame with `payload_size` bytes of payload."""
    return len(_frame_header(OP_BINARY, payload_size, masked)) + (4 if masked else 0) + payload_size


def framed_file(payload_size: int, *, masked: bool, size: int = 8 << 20) -> tuple[int, int]:
    """A memfd of whole binary frames of `payload_size` bytes (as a client sends them with
    `masked`: a zero key, so the payload reads the same), about `size` bytes and at least one
    frame: (fd, bytes per frame). For sendfile through a route that reads frames."""
    payload = bytes(range(256)) * (payload_size // 256) + bytes(payload_size % 256)
    head = _frame_header(OP_BINARY, payload_size, masked) + (b"\0\0\0\0" if masked else b"")
    one = head + payload
    fd = os.memfd_create("bench-frames")
    for _ in range(max(1, size // len(one))):
        os.write(fd, one)
    return fd, len(one)


def parse_frame(buf: bytes | bytearray) -> tuple[int, bytes, int] | None:
    """(opcode, unmasked payload, bytes used) of the first complete frame in `buf`, or None."""
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    masked = buf[1] & 0x80
    length = buf[1] & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        (length,) = struct.unpack_from("!H", buf, 2)
        pos = 4
    elif length == 127:
        if len(buf) < 10:
            return None
        (length,) = struct.unpack_from("!Q", buf, 2)
        pos = 10
    if masked:
        mask = bytes(buf[pos : pos + 4])
        pos += 4
    end = pos + length
    if len(buf) < end:
        return None
    payload = bytes(buf[pos:end])
    return opcode, unmask(payload, mask) if masked else payload, end
