"""connection/h2_channel.py's writes (contract rule 17's streams share one connection): while
other streams are open, a stream's frames go out with theirs in one write by the connection's
writer; alone, past `COALESCE_MAX` queued bytes, or once the connection is ending, a stream
writes at once and waits for it -- so a client that does not read still holds back its writers.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import trio
import trio.testing

from upgradeproxy.connection.h2_channel import COALESCE_MAX, Channel, StreamState

FIELDS = [(b":status", b"200"), (b"content-type", b"text/plain")]


class _Recorder(trio.abc.Stream):
    """A client socket that keeps each `send_all` apart; `gate` holds writes back."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.gate = trio.Event()
        self.gate.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.gate.wait()
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _client() -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    return client


async def _channel(
    n_streams: int,
) -> tuple[Channel, _Recorder, list[StreamState], h2.connection.H2Connection]:
    """A channel whose client opened `n_streams` GET streams; the preamble already written."""
    sink = _Recorder()
    channel = Channel(sink, max_streams=100, max_header_bytes=65536)
    client = _client()
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    states = []
    for i in range(n_streams):
        sid = 1 + 2 * i
        client.send_headers(sid, request, end_stream=True)
        states.append(StreamState(sid))
        channel.streams[sid] = states[-1]
    channel.h2.receive_data(client.data_to_send())
    await channel.write()
    sink.writes.clear()
    return channel, sink, states, client


def _frames(client: h2.connection.H2Connection, data: bytes) -> list[tuple[type, int]]:
    return [
        (type(e), getattr(e, "stream_id", 0))
        for e in client.receive_data(data)
        if not isinstance(e, h2.events.RemoteSettingsChanged | h2.events.SettingsAcknowledged)
    ]


async def test_concurrent_streams_leave_in_one_write() -> None:
    channel, sink, states, client = await _channel(3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.writer)
        for st in states:
            await channel.send_headers(st, FIELDS, end=True)
        assert sink.writes == []  # left to the writer
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(sink.writes) == 1
    got = _frames(client, sink.writes[0])
    assert [sid for kind, sid in got if kind is h2.events.ResponseReceived] == [1, 3, 5]


async def test_a_lone_stream_writes_at_once() -> None:
    channel, sink, states, client = await _channel(1)
    await channel.send_headers(states[0], FIELDS, end=True)  # no writer task at all
    assert len(sink.writes) == 1
    assert (h2.events.ResponseReceived, 1) in _frames(client, sink.writes[0])


async def test_past_coalesce_max_the_stream_writes_and_waits_itself() -> None:
    channel, sink, states, client = await _channel(2)
    client.increment_flow_control_window(4 * COALESCE_MAX)
    client.increment_flow_control_window(4 * COALESCE_MAX, stream_id=1)
    channel.h2.receive_data(client.data_to_send())
    await channel.send_headers(states[0], FIELDS)
    sink.gate = trio.Event()  # the client stops reading
    done = trio.Event()

    async def big_body() -> None:
        await channel.send_data(states[0], b"x" * (COALESCE_MAX + 1))
        done.set()

    async with trio.open_nursery() as nursery:  # no writer task: nobody else would write
        nursery.start_soon(big_body)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # held back by the client's socket
        sink.gate.set()
    assert done.is_set()
    assert sum(map(len, sink.writes)) > COALESCE_MAX


async def test_once_the_connection_ends_every_flush_writes_at_once() -> None:
    channel, sink, states, client = await _channel(2)
    channel.hurry(1.0)
    await channel.send_headers(states[0], FIELDS, end=True)
    assert len(sink.writes) == 1
    assert (h2.events.ResponseReceived, 1) in _frames(client, sink.writes[0])


async def test_a_tunnels_bytes_do_not_wait_for_the_other_streams() -> None:
    """`now`: a tunnel's DATA (and its window credits) go out at once, not a scheduler pass
    later with the other streams' frames."""
    channel, sink, states, client = await _channel(2)
    await channel.send_headers(states[1], FIELDS)  # left to the writer: there is none here
    assert sink.writes == []
    await channel.send_headers(states[0], FIELDS, flush=False)
    await channel.send_data(states[0], b"tunnel bytes", flush=False)
    await channel.flush(now=True)
    assert len(sink.writes) == 1  # everything queued, the other stream's HEADERS first
    got = _frames(client, sink.writes[0])
    assert got[0] == (h2.events.ResponseReceived, 3)
    assert (h2.events.DataReceived, 1) in got
