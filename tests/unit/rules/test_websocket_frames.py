"""The frame gate of WebSocket-aware routes (rule 18): one row per RFC 6455 rule or limit.

Frames are built here byte by byte; `websockets`' own frame parser is the oracle that the
headers read back, and the Close frames the proxy writes, are what a real peer reads.
"""

from __future__ import annotations

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from tests.support.ws_frames import BINARY, CLOSE, CONT, PING, PONG, TEXT, frame
from upgradeproxy.rules.websocket_frames import (
    FrameGate,
    FrameHeader,
    FramePolicy,
    RateBucket,
    close_frame,
    parse_header,
    reserved_bits,
)


def client(**limits: int) -> FrameGate:
    return FrameGate(FramePolicy("client", **limits))


def server(**limits: int) -> FrameGate:
    return FrameGate(FramePolicy("server", **limits))


def whole(gate: FrameGate, data: bytes) -> tuple[bytes, str | None, int | None]:
    """Feed `data` at once: (what went through, the rule broken, its close code)."""
    out, violation = gate.feed(data)
    return bytes(out), violation and violation.rule, violation and violation.code


# --- parse_header, against websockets' parser ----------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(frame(TEXT, b"hi", mask=False), FrameHeader(True, 0, 1, False, 2, 2),
                     id="7-bit length"),
        pytest.param(frame(BINARY, b"x" * 126, mask=False), FrameHeader(True, 0, 2, False, 126, 4),
                     id="16-bit length at its smallest"),
        pytest.param(frame(BINARY, b"x" * 65536, fin=False),
                     FrameHeader(False, 0, 2, True, 65536, 14), id="64-bit length, masked"),
        pytest.param(frame(TEXT, rsv=0x40, mask=False), FrameHeader(True, 0x40, 1, False, 0, 2),
                     id="RSV1"),
        pytest.param(frame(BINARY, length=2**40, mask=False)[:10],
                     FrameHeader(True, 0, 2, False, 2**40, 10), id="a length past 4 GiB"),
    ],
)  # fmt: skip
def test_parse_header(data: bytes, expected: FrameHeader) -> None:
    assert parse_header(data) == expected


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("mask", [True, False], ids=["masked", "unmasked"])
def test_parse_header_agrees_with_websockets(size: int, mask: bool) -> None:
    data = Frame(Opcode.BINARY, b"\xab" * size).serialize(mask=mask)
    header = parse_header(data)
    assert header is not None
    assert (header.length, header.masked, header.size + header.length) == (size, mask, len(data))


@pytest.mark.parametrize("cut", range(14))
def test_parse_header_waits_for_every_header_byte(cut: int) -> None:
    data = frame(BINARY, b"x" * 70000)  # 14-byte header
    assert parse_header(data[:cut]) is None
    assert parse_header(data[:14]) is not None


# --- the rules: one row each ------------------------------------------------------------------

PASS = None
# (gate, frames, rule broken or PASS, close code)
RULES = [
    pytest.param(client(), frame(TEXT, b"hi"), PASS, None, id="masked client text"),
    pytest.param(server(), frame(TEXT, b"hi", mask=False), PASS, None, id="unmasked server text"),
    pytest.param(client(), frame(TEXT, b"hi", mask=False), "masking", 1002,
                 id="unmasked client frame"),
    pytest.param(server(), frame(TEXT, b"hi"), "masking", 1002, id="masked server frame"),
    pytest.param(client(), frame(0x3), "opcode", 1002, id="reserved data opcode 0x3"),
    pytest.param(client(), frame(0xB), "opcode", 1002, id="reserved control opcode 0xB"),
    pytest.param(client(), frame(CONT, b"x"), "continuation", 1002,
                 id="continuation without a start"),
    pytest.param(client(), frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), "continuation", 1002,
                 id="new message inside a fragmented one"),
    pytest.param(client(), frame(TEXT, b"a", fin=False) + frame(PING, b"p") + frame(CONT, b"b"),
                 PASS, None, id="ping between fragments"),
    pytest.param(client(), frame(PING, fin=False), "control_frame", 1002,
                 id="fragmented ping"),
    pytest.param(client(), frame(PING, b"x" * 126), "control_frame", 1002,
                 id="ping of 126 bytes"),
    pytest.param(client(), frame(PONG, b"x" * 125), PASS, None, id="pong of 125 bytes"),
    pytest.param(client(), frame(TEXT, b"z", rsv=0x40), "rsv", 1002, id="RSV1 not negotiated"),
    pytest.param(client(), frame(TEXT, b"z", rsv=0x10), "rsv", 1002, id="RSV3"),
    pytest.param(FrameGate(FramePolicy("client", rsv_first=0x40)),
                 frame(TEXT, b"z", rsv=0x40, fin=False) + frame(CONT, b"z"), PASS, None,
                 id="deflate: RSV1 on a first frame"),
    pytest.param(FrameGate(FramePolicy("client", rsv_first=0x40)),
                 frame(TEXT, b"z", fin=False) + frame(CONT, b"z", rsv=0x40), "rsv", 1002,
                 id="deflate: RSV1 on a continuation"),
    pytest.param(FrameGate(FramePolicy("client", rsv_first=0x40)),
                 frame(PING, b"z", rsv=0x40), "rsv", 1002, id="deflate: RSV1 on a ping"),
    pytest.param(server(), frame(BINARY, length=2**63, mask=False), "framing", 1002,
                 id="64-bit length with its top bit set"),
    pytest.param(client(max_frame_bytes=10), frame(BINARY, b"x" * 10), PASS, None,
                 id="frame at max_frame_bytes"),
    pytest.param(client(max_frame_bytes=10), frame(BINARY, b"x" * 11), "max_frame_bytes", 1009,
                 id="frame one over max_frame_bytes"),
    pytest.param(server(max_frame_bytes=10), frame(PING, b"x" * 11, mask=False),
                 "max_frame_bytes", 1009, id="a control frame is a frame too"),
    pytest.param(client(max_message_bytes=10),
                 frame(TEXT, b"x" * 5, fin=False) + frame(CONT, b"x" * 5), PASS, None,
                 id="fragmented message at max_message_bytes"),
    pytest.param(client(max_message_bytes=10),
                 frame(TEXT, b"x" * 5, fin=False) + frame(CONT, b"x" * 6), "max_message_bytes",
                 1009, id="fragmented message one over max_message_bytes"),
    pytest.param(client(max_message_bytes=10),
                 frame(TEXT, b"x" * 8, fin=False) + frame(PING, b"p" * 8) + frame(CONT, b"x" * 2),
                 PASS, None, id="a ping inside a message is not part of it"),
    pytest.param(server(max_message_bytes=3), frame(TEXT, b"abcd", mask=False),
                 "max_message_bytes", 1009, id="the server's messages too"),
]  # fmt: skip


@pytest.mark.parametrize(("gate", "data", "rule", "code"), RULES)
def test_rules(gate: FrameGate, data: bytes, rule: str | None, code: int | None) -> None:
    out, broken, close_code = whole(gate, data)
    assert (broken, close_code) == (rule, code)
    if rule is None:
        assert out == data
        assert gate.at_boundary


def test_offending_frame_is_never_let_through() -> None:
    """Rule 18: decided from the header, before any byte of the offending frame goes on."""
    good = frame(TEXT, b"fine") + frame(PING, b"p")
    gate = client(max_frame_bytes=100)
    out, violation = gate.feed(good + frame(BINARY, b"x" * 101) + frame(TEXT, b"after"))
    assert bytes(out) == good
    assert violation is not None
    assert violation.rule == "max_frame_bytes"
    assert gate.feed(frame(TEXT, b"more")) == (b"", None)  # a stopped gate takes nothing


def test_header_split_across_chunks_is_held_not_forwarded() -> None:
    """A header arriving a byte at a time goes on only once whole, and only if allowed."""
    gate = client(max_frame_bytes=1000)
    data = frame(BINARY, b"y" * 500)  # 4-byte length header + 4-byte key
    out = [bytes(gate.feed(data[i : i + 1])[0]) for i in range(8)]
    assert out[:7] == [b""] * 7
    assert out[7] == data[:8]
    rest, violation = gate.feed(data[8:])
    assert (bytes(rest), violation) == (data[8:], None)
    assert gate.messages == 1


def test_offending_header_split_across_chunks() -> None:
    gate = client(max_frame_bytes=10)
    data = frame(TEXT, b"ok") + frame(BINARY, b"z" * 300)
    first, violation = gate.feed(data[:10])  # the good frame and 2 bytes of the bad header
    assert (bytes(first), violation) == (data[:8], None)
    rest, violation = gate.feed(data[10:])
    assert bytes(rest) == b""
    assert violation is not None
    assert violation.code == 1009


def test_messages_counted_once_per_message_not_per_frame() -> None:
    gate = client()
    data = (
        frame(TEXT, b"a", fin=False) + frame(CONT, b"b", fin=False) + frame(PING)
        + frame(CONT, b"c") + frame(BINARY, b"d") + frame(PONG) + frame(CLOSE, b"\x03\xe8")
    )  # fmt: skip
    assert whole(gate, data) == (data, None, None)
    assert gate.messages == 2
    assert gate.closed


def test_payload_counted_without_feed() -> None:
    """`passed` is how a relay that splices the payload in the kernel keeps the gate in step."""
    gate = server()
    data = frame(BINARY, b"p" * 100_000, mask=False) + frame(TEXT, b"t", mask=False)
    out, _ = gate.feed(data[:10])  # the 10-byte header only
    assert (bytes(out), gate.payload_left) == (data[:10], 100_000)
    gate.passed(100_000)
    assert gate.at_boundary
    out, _ = gate.feed(data[10 + 100_000 :])
    assert (bytes(out), gate.messages) == (data[-3:], 2)


@pytest.mark.parametrize("cut", [0, 3, 7], ids=["at a boundary", "mid header", "mid payload"])
def test_stop_ends_at_the_next_frame_boundary(cut: int) -> None:
    first, second = frame(BINARY, b"1" * 10, mask=False), frame(BINARY, b"2", mask=False)
    gate = server()
    head, _ = gate.feed(first[:cut])
    gate.stop()
    rest, violation = gate.feed(first[cut:] + second)
    assert (violation, gate.stopped) == (None, True)
    # The frame under way finishes; nothing after it (nothing at all if none was under way).
    assert bytes(head) + bytes(rest) == (first if cut else b"")


def test_rate_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    bucket = RateBucket(4, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]  # a burst of 4
    now[0] += 1 / 4
    assert [bucket.take(), bucket.take()] == [True, False]  # one more per 1/rate seconds
    now[0] += 60
    assert sum(bucket.take() for _ in range(10)) == 4  # never more than its size


def test_rate_counts_messages_not_frames_and_not_control_frames() -> None:
    now = [0.0]
    gate = FrameGate(FramePolicy("client"), RateBucket(2, clock=lambda: now[0]))
    fragmented = frame(TEXT, b"a", fin=False) + frame(CONT, b"b") + frame(PING) + frame(PONG)
    assert whole(gate, fragmented + frame(BINARY, b"c"))[1] is None
    out, rule, code = whole(gate, frame(TEXT, b"third") + frame(PING))
    assert (out, rule, code) == (b"", "messages_per_second", 1008)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([], (0, 0), id="none"),
        pytest.param([b"permessage-deflate; client_max_window_bits"], (0x40, 0), id="deflate"),
        pytest.param([b"Permessage-Deflate"], (0x40, 0), id="any case"),
        pytest.param([b"permessage-deflate, x-webkit-foo"], (0x70, 0x70), id="an unknown one"),
    ],
)
def test_reserved_bits_follow_the_negotiated_extensions(
    values: list[bytes], expected: tuple[int, int]
) -> None:
    assert reserved_bits(values) == expected


@pytest.mark.parametrize("mask", [None, b"\x01\x02\x03\x04"], ids=["to a client", "to a server"])
def test_close_frame_reads_back_with_websockets(mask: bytes | None) -> None:
    data = close_frame(1009, "max_message_bytes " + "x" * 200, mask=mask)
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask is not None)
    try:
        next(parser)
    except StopIteration as done:
        parsed = done.value
    close = Close.parse(parsed.data)
    assert close.code == 1009
    assert close.reason.startswith("max_message_bytes")
    assert len(parsed.data) == 125
