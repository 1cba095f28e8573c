"""Reading RFC 6455 frames as they pass a tunnel, one direction at a time (contract rule 18).

A `FrameGate` is fed the bytes one peer sends, chunk by chunk, and answers with the bytes that
may go on and, at most once, the `Violation` that ends the tunnel. Invariants:

- Every decision is made from a frame's header (2 to 14 bytes), before any byte of that frame
  is let through, so a gate's output always ends on a frame boundary when it reports a
  violation or stops, and the proxy's own Close frame lands between two frames.
- Payloads are counted, never copied, unmasked or kept: a chunk goes back whole, or as a
  memoryview of its start. Only a header split across chunks is held (at most 13 bytes).
- No I/O and no clock reads of its own: the rate bucket takes a clock, so any relay (an
  HTTP/1.1 socket pair, an HTTP/2 stream) can drive a gate, and a test can drive time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL",
    "CLOSE_TOO_BIG",
    "FrameGate",
    "FrameHeader",
    "FramePolicy",
    "RateBucket",
    "Violation",
    "close_frame",
    "parse_header",
    "reserved_bits",
]

Sender = Literal["client", "server"]
Buffer = bytes | bytearray | memoryview

# RFC 6455 §7.4.1 status codes the proxy sends.
CLOSE_GOING_AWAY: Final = 1001  # to the side that did nothing wrong
CLOSE_PROTOCOL: Final = 1002  # masking, opcode, continuation, reserved bits, control frames
CLOSE_POLICY: Final = 1008  # messages_per_second
CLOSE_TOO_BIG: Final = 1009  # max_frame_bytes, max_message_bytes

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
RSV1: Final = 0x40  # permessage-deflate's "this message is compressed" (RFC 7692 §6)
MAX_CONTROL_PAYLOAD: Final = 125  # RFC 6455 §5.5
_ANY_RSV: Final = 0x70
_NO_LIMIT: Final = 1 << 64  # above any length a header can state


class FrameHeader(NamedTuple):
    """One frame's header as read off the wire; `length` is the payload's, in bytes."""

    fin: bool
    rsv: int  # the three RSV bits in place: 0x40, 0x20, 0x10
    opcode: int
    masked: bool
    length: int
    size: int  # bytes of the header itself


@dataclass(frozen=True, slots=True)
class Violation:
    """Why a gate stopped: the close code for the sender and the rule broken (the log's
    `error`); `rule` is a config key or a protocol rule's name."""

    code: int
    rule: str
    why: str

    def __str__(self) -> str:
        return f"websocket {self.rule}: {self.why}"


@dataclass(frozen=True, slots=True)
class FramePolicy:
    """What one sender's frames must obey; 0 means no limit.

    `rsv_first` / `rsv_rest`: the reserved bits allowed on the first frame of a data message
    and on every other frame (what the negotiated extensions define; see `reserved_bits`).
    """

    sender: Sender
    max_frame_bytes: int = 0
    max_message_bytes: int = 0
    rsv_first: int = 0
    rsv_rest: int = 0


class RateBucket:
    """A token bucket: `rate` tokens at most, refilled at `rate` per second; full at start."""

    __slots__ = ("clock", "last", "rate", "tokens")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.tokens = rate
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self.clock()
        tokens = self.tokens + (now - self.last) * self.rate
        if tokens > self.rate:
            tokens = self.rate
        self.last = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


def parse_header(data: Buffer, pos: int = 0) -> FrameHeader | None:
    """The header starting at `data[pos]`, or None while it is incomplete (RFC 6455 §5.2)."""
    avail = len(data) - pos
    if avail < 2:
        return None
    b0, b1 = data[pos], data[pos + 1]
    length = b1 & 0x7F
    size = 2 + (4 if b1 & 0x80 else 0) + (2 if length == 126 else 8 if length == 127 else 0)
    if avail < size:
        return None
    if length == 126:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
    elif length == 127:
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
    return FrameHeader(bool(b0 & 0x80), b0 & _ANY_RSV, b0 & 0x0F, bool(b1 & 0x80), length, size)


def reserved_bits(extensions: Iterable[bytes]) -> tuple[int, int]:
    """(rsv_first, rsv_rest) for the `Sec-WebSocket-Extensions` values of a 101.

    permessage-deflate sets RSV1 on a data message's first frame only (RFC 7692 §6). An
    extension the proxy does not know may define any bit on any frame, so then none is checked.
    """
    names = {
        item.split(b";", 1)[0].strip().lower()
        for value in extensions
        for item in value.split(b",")
        if item.strip()
    }
    if names - {b"permessage-deflate"}:
        return _ANY_RSV, _ANY_RSV
    return (RSV1, 0) if names else (0, 0)


def close_frame(code: int, reason: str, *, mask: bytes | None) -> bytes:
    """A Close frame with `code` and `reason` (trimmed to fit 125 bytes), masked with `mask`
    (4 bytes) for a server, as a client must (RFC 6455 §5.3), or unmasked for a client."""
    payload = code.to_bytes(2, "big") + reason.encode()[: MAX_CONTROL_PAYLOAD - 2]
    if mask is None:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + mask + masked


class FrameGate:
    """The frames of one direction: RFC 6455 §5 checks, the policy, and message counts.

    `feed(data)` returns `(forward, violation)`: the bytes to pass on now (all of `data`, a
    view of its start, or, after a header split across chunks, the held bytes and what
    follows), and the first broken rule, after which the gate takes nothing more. `stop()`
    asks for an end at the next frame boundary: `stopped` turns true when it is reached.
    """

    __slots__ = (
        "_held",
        "bucket",
        "closed",
        "in_message",
        "mask_bit",
        "max_frame",
        "max_message",
        "message_bytes",
        "messages",
        "observer",
        "payload_left",
        "policy",
        "stopped",
        "stopping",
        "violation",
    )

    def __init__(
        self,
        policy: FramePolicy,
        bucket: RateBucket | None = None,
        observer: Callable[[FrameHeader], None] | None = None,
    ) -> None:
        self.policy = policy
        self.bucket = bucket
        self.observer = observer  # sees each header let through (tests, tracing)
        self.mask_bit = 0x80 if policy.sender == "client" else 0  # clients mask, servers not
        self.max_frame = policy.max_frame_bytes or _NO_LIMIT
        self.max_message = policy.max_message_bytes or _NO_LIMIT
        self.payload_left = 0  # bytes of the current frame's payload still to pass
        self.in_message = False  # a fragmented data message is under way (§5.4)
        self.message_bytes = 0  # payload of the message under way, as framed on the wire
        self.messages = 0  # data messages whose last frame was let through
        self.closed = False  # a Close frame was let through
        self.stopping = False
        self.stopped = False
        self.violation: Violation | None = None
        self._held = b""  # the start of a header that has not all arrived

    @property
    def at_boundary(self) -> bool:
        """Whether everything let through so far ends on a frame boundary."""
        return self.payload_left == 0

    def stop(self) -> None:
        """End at the next frame boundary (at once if already on one)."""
        self.stopping = True
        if self.payload_left == 0:
            self.stopped = True

    def passed(self, n: int) -> None:
        """Count `n` payload bytes of the current frame that went on without `feed`
        (e.g. spliced in the kernel); at most `payload_left`."""
        self.payload_left -= n
        if self.stopping and not self.payload_left:
            self.stopped = True

    def feed(self, data: Buffer) -> tuple[Buffer, Violation | None]:
        """Read `data`; see the class docstring."""
        if self.stopped or self.violation is not None:
            return b"", None
        if self._held:
            data = self._held + bytes(data)
            self._held = b""
        size = len(data)
        left = self.payload_left
        if left >= size:  # all payload: the bulk case, decided without a loop
            self.payload_left = left = left - size
            if self.stopping and not left:
                self.stopped = True
            return data, None
        pos = left
        self.payload_left = 0
        # The header is read inline, not with parse_header: this loop runs once per frame.
        while pos < size:
            if self.stopping:
                self.stopped = True
                return memoryview(data)[:pos], None
            if size - pos < 2:
                return self._hold(data, pos)
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length > 125:
                extra = 2 if length == 126 else 8
                if size < start + extra:
                    return self._hold(data, pos)
                length = int.from_bytes(data[start : start + extra], "big")
                start += extra
            if b1 & 0x80:
                start += 4
            if start > size:
                return self._hold(data, pos)
            violation = self._judge(b0, b1, length)
            if violation is not None:
                self.violation = violation
                return memoryview(data)[:pos], violation
            if self.observer is not None:
                header = FrameHeader(
                    bool(b0 & 0x80), b0 & _ANY_RSV, b0 & 0x0F, bool(b1 & 0x80), length, start - pos
                )
                self.observer(header)
            pos = start + length
            if pos > size:
                self.payload_left = pos - size
                return data, None
        if self.stopping:
            self.stopped = True
        return data, None

    def _hold(self, data: Buffer, pos: int) -> tuple[Buffer, None]:
        """Keep the incomplete header at `pos`; pass what came before it."""
        self._held = bytes(data[pos:])
        return memoryview(data)[:pos], None

    def _judge(self, b0: int, b1: int, length: int) -> Violation | None:
        """The rule a frame breaks, if any; otherwise note what it starts or ends."""
        if (b1 & 0x80) != self.mask_bit:
            why = "an unmasked frame from the client" if self.mask_bit else (
                "a masked frame from the server"
            )  # fmt: skip
            return Violation(CLOSE_PROTOCOL, "masking", why)
        opcode = b0 & 0x0F
        if opcode >= OP_CLOSE:
            return self._control(b0, length)
        if length >> 63:
            return Violation(CLOSE_PROTOCOL, "framing", "a 64-bit length with its top bit set")
        policy = self.policy
        if opcode == OP_CONTINUATION:
            if not self.in_message:
                return Violation(CLOSE_PROTOCOL, "continuation", "no message to continue")
            allowed = policy.rsv_rest
        elif opcode <= OP_BINARY:
            if self.in_message:
                why = "a new message before the fragmented one ended"
                return Violation(CLOSE_PROTOCOL, "continuation", why)
            allowed = policy.rsv_first
        else:
            return Violation(CLOSE_PROTOCOL, "opcode", f"reserved opcode {opcode:#x}")
        if b0 & _ANY_RSV & ~allowed:
            return Violation(CLOSE_PROTOCOL, "rsv", _rsv_why(b0 & _ANY_RSV & ~allowed))
        if length > self.max_frame:
            why = f"a frame of {length} bytes, over {policy.max_frame_bytes}"
            return Violation(CLOSE_TOO_BIG, "max_frame_bytes", why)
        total = self.message_bytes + length if opcode == OP_CONTINUATION else length
        if total > self.max_message:
            why = f"a message of over {policy.max_message_bytes} bytes"
            return Violation(CLOSE_TOO_BIG, "max_message_bytes", why)
        if opcode and self.bucket is not None and not self.bucket.take():
            why = f"more than {self.bucket.rate:g} messages per second"
            return Violation(CLOSE_POLICY, "messages_per_second", why)
        self.message_bytes = total
        if b0 & 0x80:
            self.messages += 1
            self.in_message = False
        else:
            self.in_message = True
        return None

    def _control(self, b0: int, length: int) -> Violation | None:
        """Close, Ping and Pong (RFC 6455 §5.5): whole, short, never counted as messages."""
        opcode = b0 & 0x0F
        if opcode > OP_PONG:
            return Violation(CLOSE_PROTOCOL, "opcode", f"reserved opcode {opcode:#x}")
        if not b0 & 0x80 or length > MAX_CONTROL_PAYLOAD:
            why = "a fragmented control frame" if not b0 & 0x80 else (
                f"a control frame of {length} bytes, over 125"
            )  # fmt: skip
            return Violation(CLOSE_PROTOCOL, "control_frame", why)
        if b0 & _ANY_RSV & ~self.policy.rsv_rest:
            return Violation(CLOSE_PROTOCOL, "rsv", _rsv_why(b0 & _ANY_RSV & ~self.policy.rsv_rest))
        if length > self.max_frame:
            why = f"a frame of {length} bytes, over {self.policy.max_frame_bytes}"
            return Violation(CLOSE_TOO_BIG, "max_frame_bytes", why)
        if opcode == OP_CLOSE:
            self.closed = True
        return None


def _rsv_why(bits: int) -> str:
    names = "/".join(f"RSV{i}" for i, bit in ((1, 0x40), (2, 0x20), (3, 0x10)) if bits & bit)
    return f"{names} set without an extension that defines it"
