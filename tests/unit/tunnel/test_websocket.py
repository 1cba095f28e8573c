"""The frame-reading relay (rule 18) over trio memory streams: the path TLS tunnels take.

Each test plays both peers by hand and reads what each one got, frame by frame, with the
`websockets` parser; the mock clock makes the close grace cost no time.
"""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from tests.support.ws_frames import BINARY, CLOSE, PING, TEXT, frame
from upgradeproxy.config.model import WebSocketLimits
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.telemetry.metrics import Telemetry
from upgradeproxy.tunnel.relay import TunnelStats, run_tunnel
from upgradeproxy.tunnel.websocket import FramedTunnel, framed_tunnel


def parsed(data: bytes, *, masked: bool) -> list[tuple[Opcode, bytes | int]]:
    """(opcode, payload, or the close code for a Close) of each whole frame in `data`."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[tuple[Opcode, bytes | int]] = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=masked)
        with pytest.raises(StopIteration) as done:
            next(parser)
        f = done.value.value
        out.append((f.opcode, Close.parse(f.data).code if f.opcode is Opcode.CLOSE else f.data))
    return out


async def read_all(stream: trio.abc.Stream, into: bytearray) -> None:
    while data := await stream.receive_some(65536):
        into += data


class Peers:
    """The tunnel between a client and an upstream, each a memory stream the test drives."""

    def __init__(self, limits: WebSocketLimits, telemetry: Telemetry) -> None:
        self.client, proxy_client = trio.testing.memory_stream_pair()
        self.upstream, proxy_upstream = trio.testing.memory_stream_pair()
        self.frames = FramedTunnel(limits, [], "*/", telemetry)
        self.stats = TunnelStats()
        self.proxy_ends = (proxy_client, proxy_upstream)
        self.client_got, self.upstream_got = bytearray(), bytearray()

    async def run(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(read_all, self.client, self.client_got)
        nursery.start_soon(read_all, self.upstream, self.upstream_got)
        await run_tunnel(*self.proxy_ends, idle_timeout=60, stats=self.stats, frames=self.frames)


async def test_a_violation_closes_both_sides_on_frame_boundaries(autojump_clock: object) -> None:
    telemetry = Telemetry()
    peers = Peers(WebSocketLimits(max_frame_bytes=100), telemetry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.run, nursery)
        await peers.upstream.send_all(frame(TEXT, b"hi", mask=False))
        await peers.client.send_all(frame(TEXT, b"ok") + frame(BINARY, b"x" * 101))
    assert parsed(bytes(peers.client_got), masked=False) == [
        (Opcode.TEXT, b"hi"), (Opcode.CLOSE, 1009),
    ]  # fmt: skip
    assert parsed(bytes(peers.upstream_got), masked=True) == [
        (Opcode.TEXT, b"ok"), (Opcode.CLOSE, 1001),
    ]  # fmt: skip
    assert (peers.stats.first_close, peers.stats.path) == ("policy", "portable+frames")
    rec = ExchangeRecord(client="c", route="*/")
    peers.frames.report(rec)
    assert (rec.messages_in, rec.messages_out) == (1, 1)
    assert "max_frame_bytes" in rec.error
    closes = telemetry.registry.get_sample_value(
        "upgradeproxy_websocket_closes_total", {"route": "*/", "code": "1009"}
    )
    assert closes == 1


async def test_the_frame_under_way_to_the_offender_finishes_first(autojump_clock: object) -> None:
    peers = Peers(WebSocketLimits(), Telemetry())
    long_frame = frame(BINARY, b"L" * 5000, mask=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.run, nursery)
        await peers.upstream.send_all(long_frame[:1000])
        await trio.testing.wait_all_tasks_blocked()
        await peers.client.send_all(frame(TEXT, b"unmasked", mask=False))
        await trio.testing.wait_all_tasks_blocked()
        assert peers.upstream_got == b""  # nothing of the offending frame, no Close yet
        await peers.upstream.send_all(long_frame[1000:] + frame(TEXT, b"after", mask=False))
    assert parsed(bytes(peers.client_got), masked=False) == [
        (Opcode.BINARY, b"L" * 5000), (Opcode.CLOSE, 1002),
    ]  # fmt: skip
    assert parsed(bytes(peers.upstream_got), masked=True) == [(Opcode.CLOSE, 1001)]


async def test_a_frame_that_never_finishes_gets_no_close(autojump_clock: object) -> None:
    """A Close in the middle of a frame would corrupt the stream: after the grace, the
    offender just gets the connection closed."""
    peers = Peers(WebSocketLimits(), Telemetry())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.run, nursery)
        await peers.upstream.send_all(frame(BINARY, b"L" * 5000, mask=False)[:1000])
        await trio.testing.wait_all_tasks_blocked()
        await peers.client.send_all(frame(0x3))  # a reserved opcode
    assert len(peers.client_got) == 1000  # the start of the frame, and nothing after it
    assert parsed(bytes(peers.upstream_got), masked=True) == [(Opcode.CLOSE, 1001)]
    assert peers.stats.first_close == "policy"


async def test_early_bytes_are_gated_too(autojump_clock: object) -> None:
    """Bytes that came with the handshake heads pass the gates like any other."""
    peers = Peers(WebSocketLimits(max_message_bytes=4), Telemetry())
    peers.frames.early(frame(TEXT, b"1234") + frame(TEXT, b"12345"), b"")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.run, nursery)
    assert parsed(bytes(peers.upstream_got), masked=True) == [
        (Opcode.TEXT, b"1234"), (Opcode.CLOSE, 1001),
    ]  # fmt: skip
    assert parsed(bytes(peers.client_got), masked=False) == [(Opcode.CLOSE, 1009)]


async def test_clean_close_is_relayed_and_counted(autojump_clock: object) -> None:
    telemetry = Telemetry()
    peers = Peers(WebSocketLimits(), telemetry)
    bye = struct.pack("!H", 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.run, nursery)
        await peers.client.send_all(frame(TEXT, b"a", fin=False) + frame(PING) + frame(0, b"b"))
        await peers.upstream.send_all(frame(TEXT, b"ab", mask=False))
        await peers.client.send_all(frame(CLOSE, bye))
        await peers.upstream.send_all(frame(CLOSE, bye, mask=False))
        await peers.upstream.send_eof()
        await peers.client.send_eof()
    assert peers.stats.first_close in ("client", "upstream")
    assert parsed(bytes(peers.client_got), masked=False)[-1] == (Opcode.CLOSE, 1000)
    counted = {
        d: telemetry.registry.get_sample_value(
            "upgradeproxy_websocket_messages_total", {"route": "*/", "direction": d}
        )
        for d in ("up", "down")
    }
    assert counted == {"up": 1, "down": 1}


@pytest.mark.parametrize(
    ("limits", "protocols", "framed"),
    [
        pytest.param(None, [b"websocket"], False, id="no block: the splice"),
        pytest.param(WebSocketLimits(), [b"WebSocket"], True, id="block and websocket"),
        pytest.param(WebSocketLimits(), [b"h2c"], False, id="block, but another protocol"),
    ],
)
def test_only_websocket_tunnels_of_routes_with_the_block_are_framed(
    limits: WebSocketLimits | None, protocols: list[bytes], framed: bool
) -> None:
    made = framed_tunnel(limits, protocols, [], "*/", Telemetry())
    assert (made is not None) == framed


def test_a_relay_of_its_own_drives_the_gates_directly() -> None:
    """What an HTTP/2 stream relay does: feed each direction's gate, count as it goes, and
    let `report` fill the log line from whichever gate stopped."""
    telemetry = Telemetry()
    made = framed_tunnel(WebSocketLimits(max_message_bytes=3), [b"websocket"], [], "*/", telemetry)
    assert made is not None
    first = frame(TEXT, b"abc")
    forward, violation = made.up.feed(first + frame(TEXT, b"abcd"))
    assert (bytes(forward), violation and violation.code) == (first, 1009)
    made.count()
    counted = telemetry.registry.get_sample_value(
        "upgradeproxy_websocket_messages_total", {"route": "*/", "direction": "up"}
    )
    assert counted == 1
    rec = ExchangeRecord(client="c", route="*/")
    made.report(rec)
    assert (rec.messages_in, rec.messages_out) == (1, 0)
    assert "max_message_bytes" in rec.error
