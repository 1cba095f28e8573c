"""Rule 18's frame reader is incremental: any frame stream, cut at any byte boundaries, reads
as the same frames, passes the same bytes, and stops at the same frame, as read whole."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from upgradeproxy.rules.websocket_frames import FrameGate, FrameHeader, FramePolicy


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame, often a broken one: any opcode, RSV bits, FIN, masking and length form."""
    opcode = draw(st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]))
    fin = draw(st.booleans())
    rsv = draw(st.sampled_from([0, 0, 0, 0x40, 0x10]))
    masked = draw(st.integers(0, 9)) > 0  # now and then an unmasked one
    size = draw(st.sampled_from([0, 1, 5, 125, 126, 300, 65535, 65536, 70_000]))
    form = draw(st.sampled_from(["short", "16", "64"])) if size < 126 else (
        "16" if size < 65536 else "64"
    )  # fmt: skip
    b0 = (0x80 if fin else 0) | rsv | opcode
    m = 0x80 if masked else 0
    if form == "short":
        head = bytes((b0, m | size))
    elif form == "16":
        head = bytes((b0, m | 126)) + struct.pack("!H", size)
    else:
        head = bytes((b0, m | 127)) + struct.pack("!Q", size)
    return head + (b"\x5a\x5b\x5c\x5d" if masked else b"") + b"\xee" * size


def read(chunks: list[bytes]) -> tuple[list[FrameHeader], bytes, str | None, int]:
    """Feed `chunks` to a fresh client gate: (headers let through, bytes out, rule, messages)."""
    seen: list[FrameHeader] = []
    gate = FrameGate(FramePolicy("client", max_frame_bytes=66_000), observer=seen.append)
    out = bytearray()
    rule = None
    for chunk in chunks:
        forward, violation = gate.feed(chunk)
        out += forward
        if violation is not None:
            rule = violation.rule
            break
    return seen, bytes(out), rule, gate.messages


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(marks)]


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(frames(), min_size=1, max_size=8).map(b"".join),
    points=st.lists(st.integers(min_value=0), max_size=40),
)
def test_any_cut_reads_the_same_frames(stream: bytes, points: list[int]) -> None:
    assert read(cut(stream, points)) == read([stream])


@settings(max_examples=50, deadline=None)
@given(stream=st.lists(frames(), min_size=1, max_size=4).map(b"".join))
def test_a_byte_at_a_time_reads_the_same_frames(stream: bytes) -> None:
    whole = read([stream])
    by_byte = read([stream[i : i + 1] for i in range(len(stream))])
    assert by_byte == whole
    headers, out, rule, _ = whole
    if rule is None:  # every byte went through, and each frame was read once
        assert out == stream
        assert sum(h.size + h.length for h in headers) == len(stream)
    else:  # what went through is exactly the frames before the offending one
        assert out == stream[: sum(h.size + h.length for h in headers)]
