"""RFC 9113's MUSTs for a server, one row each, against the running proxy (no h2spec in Debian,
PyPI or npm: this table stands in for it). Each row sends frames past the client library's
own checks and names what the RFC requires back: a connection error (GOAWAY with its code),
a stream error (RST_STREAM), or a response."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import h2.errors
import h2.events
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.support.configs import h2_yaml
from tests.support.h2_clients import H2Peer
from tests.support.peers import respond_ok_forever

E = h2.errors.ErrorCodes
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


def _headers(client: H2Peer, sid: int, fields=REQUEST, *flags: str) -> HeadersFrame:
    frame = HeadersFrame(sid)
    frame.data = client.conn.encoder.encode(fields)
    for flag in flags or ("END_HEADERS", "END_STREAM"):
        frame.flags.add(flag)
    return frame


def _sent(client: H2Peer, fields: list[tuple[bytes, bytes]], end: bool = True) -> list[Frame]:
    """Send a request through the client library (its checks are off): stream 1."""
    client.request(fields=fields, end=end)
    return []


def _data(sid: int, data: bytes = b"x") -> DataFrame:
    frame = DataFrame(sid)
    frame.data = data
    return frame


def _settings(**values: int) -> SettingsFrame:
    frame = SettingsFrame(0)
    frame.settings = {getattr(SettingsFrame, k): v for k, v in values.items()}
    return frame


def _window(sid: int, increment: int) -> WindowUpdateFrame:
    frame = WindowUpdateFrame(sid)
    frame.window_increment = increment
    return frame


def _raw_frame(kind: int, sid: int, payload: bytes, flags: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


Builder = Callable[[H2Peer], list[Frame | bytes]]

ROWS: list[tuple[str, Builder, tuple[str, int]]] = [
    ("4.2 a frame over SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR",
     lambda c: [_data(1, b"x" * 20000)], ("goaway", E.FRAME_SIZE_ERROR)),
    ("5.1 DATA on an idle stream: PROTOCOL_ERROR",
     lambda c: [_data(1)], ("goaway", E.PROTOCOL_ERROR)),
    ("5.1.1 a client stream with an even id: PROTOCOL_ERROR",
     lambda c: [_headers(c, 2)], ("goaway", E.PROTOCOL_ERROR)),
    ("5.1.1 a stream id lower than one already used: PROTOCOL_ERROR",
     lambda c: [_headers(c, 5), _headers(c, 3)], ("goaway", E.PROTOCOL_ERROR)),
    ("5.4.1 a header block that does not decode: COMPRESSION_ERROR",
     lambda c: [_raw_frame(0x1, 1, b"\xff\xff\xff\xff\xff", 0x5)], ("goaway", E.COMPRESSION_ERROR)),
    ("6.1 DATA on stream 0: PROTOCOL_ERROR",
     lambda c: [_raw_frame(0x0, 0, b"x")], ("goaway", E.PROTOCOL_ERROR)),
    ("6.2 HEADERS on stream 0: PROTOCOL_ERROR",
     lambda c: [_raw_frame(0x1, 0, _headers(c, 1).data, 0x5)], ("goaway", E.PROTOCOL_ERROR)),
    ("6.3 PRIORITY of the wrong length: FRAME_SIZE_ERROR",
     lambda c: [_raw_frame(0x2, 1, b"\x00\x00\x00")], ("reset", E.FRAME_SIZE_ERROR)),
    ("6.4 RST_STREAM on an idle stream: PROTOCOL_ERROR",
     lambda c: [_raw_frame(0x3, 7, b"\x00\x00\x00\x08")], ("goaway", E.PROTOCOL_ERROR)),
    ("6.5 SETTINGS on a stream: PROTOCOL_ERROR",
     lambda c: [_raw_frame(0x4, 1, b"")], ("goaway", E.PROTOCOL_ERROR)),
    # RFC 9113 says FRAME_SIZE_ERROR; the h2 library parses the frame first and answers
    # PROTOCOL_ERROR -- a connection error all the same.
    ("6.5 a SETTINGS ACK with a payload: a connection error (h2: PROTOCOL_ERROR)",
     lambda c: [_raw_frame(0x4, 0, b"\x00\x03\x00\x00\x00\x01", 0x1)],
     ("goaway", E.PROTOCOL_ERROR)),
    ("6.5.2 ENABLE_PUSH other than 0 or 1: PROTOCOL_ERROR",
     lambda c: [_settings(ENABLE_PUSH=2)], ("goaway", E.PROTOCOL_ERROR)),
    ("6.5.2 INITIAL_WINDOW_SIZE over 2^31-1: FLOW_CONTROL_ERROR",
     lambda c: [_settings(INITIAL_WINDOW_SIZE=2**31)], ("goaway", E.FLOW_CONTROL_ERROR)),
    ("6.5.2 MAX_FRAME_SIZE under 16384: PROTOCOL_ERROR",
     lambda c: [_settings(MAX_FRAME_SIZE=100)], ("goaway", E.PROTOCOL_ERROR)),
    ("6.7 PING on a stream: PROTOCOL_ERROR",
     lambda c: [_raw_frame(0x6, 1, b"\x00" * 8)], ("goaway", E.PROTOCOL_ERROR)),
    ("6.7 PING of the wrong length: FRAME_SIZE_ERROR",
     lambda c: [_raw_frame(0x6, 0, b"\x00" * 7)], ("goaway", E.FRAME_SIZE_ERROR)),
    ("6.9 a zero WINDOW_UPDATE on the connection: PROTOCOL_ERROR",
     lambda c: [_window(0, 0)], ("goaway", E.PROTOCOL_ERROR)),
    ("6.9.1 a connection window over 2^31-1: FLOW_CONTROL_ERROR",
     lambda c: [_window(0, 2**31 - 1)], ("goaway", E.FLOW_CONTROL_ERROR)),
    ("6.10 CONTINUATION without HEADERS: PROTOCOL_ERROR",
     lambda c: [ContinuationFrame(1)], ("goaway", E.PROTOCOL_ERROR)),
    ("6.10 a frame between HEADERS and its CONTINUATION: PROTOCOL_ERROR",
     lambda c: [_headers(c, 1, REQUEST, "END_STREAM"), PingFrame(0)], ("goaway", E.PROTOCOL_ERROR)),
    ("8.1.1 a malformed request (connection-specific field): 400 on its stream",
     lambda c: _sent(c, [*REQUEST, (b"connection", b"close")]), ("status", 400)),
    ("8.2 an upper-case field name: 400 on its stream",
     lambda c: _sent(c, [*REQUEST, (b"X-A", b"1")]), ("status", 400)),
    ("8.3.1 a request without :path: 400 on its stream",
     lambda c: _sent(c, REQUEST[:3]), ("status", 400)),
    ("8.5 CONNECT without :protocol: 405",
     lambda c: _sent(c, [(b":method", b"CONNECT"), (b":authority", b"a:443")], end=False),
     ("status", 405)),
    ("a well-formed request: 200", lambda c: _sent(c, REQUEST), ("status", 200)),
]  # fmt: skip


@pytest.mark.parametrize(("builder", "expected"), [pytest.param(b, e, id=i) for i, b, e in ROWS])
def test_rfc9113_server_must(make_proxy, raw_upstream, builder: Builder, expected):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    assert client.until(
        lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.events)
    )
    wire = b"".join(f if isinstance(f, bytes) else f.serialize() for f in builder(client))
    with contextlib.suppress(OSError):
        client.send_raw(wire)
    kind, code = expected
    if kind == "goaway":
        # Not every row's frame can be parsed by the client library's state machine, so
        # read the proxy's GOAWAY off the wire.
        assert client.until(lambda: client.goaway() is not None or client.closed)
        goaway = client.goaway()
        assert goaway is not None, "closed without GOAWAY"
        assert goaway.error_code == code
        assert client.until(lambda: client.closed)
    elif kind == "reset":
        assert client.until(lambda: bool(client.of(1, h2.events.StreamReset)) or client.closed)
        resets = client.of(1, h2.events.StreamReset)
        goaway = client.goaway()
        got = resets[0].error_code if resets else (goaway.error_code if goaway else None)
        assert got == code
    else:
        assert client.response(1)[0] == code
