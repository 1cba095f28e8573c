"""RFC 6455 frames built byte by byte, for tests that play a WebSocket peer by hand."""

from __future__ import annotations

import os
import struct

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
    length: int | None = None,
) -> bytes:  # fmt: skip
    """One frame; `mask` for a client's (a fresh random key each time); `length` overrides the
    declared payload length (the payload is then left out when masking is off)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 1 << 16:
        head = bytes((b0, m | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, m | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frames_of(data: bytes, *, masked: bool) -> list[Frame]:
    """`data` parsed by `websockets` into whole frames; fails on a partial one at the end."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=masked)
        try:
            next(parser)
            pytest.fail("a partial frame at the end")
        except StopIteration as done:
            out.append(done.value)
    return out


def close_code(f: Frame) -> int:
    assert f.opcode is Opcode.CLOSE, f
    return Close.parse(f.data).code
