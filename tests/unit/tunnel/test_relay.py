"""Tests for the post-101 byte tunnel, run against both the splice and the portable path."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from upgradeproxy.tunnel.relay import Direction, Ending, TunnelStats, run_tunnel

MiB = 1 << 20
GUARD = 30  # seconds: no test may hang longer than this


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected loopback TCP pair: (connecting end, accepted end)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    try:
        near = await trio.open_tcp_stream("127.0.0.1", port)
        far = await listener.accept()
    finally:
        await listener.aclose()
    assert isinstance(far, trio.SocketStream)
    return near, far


@dataclass
class Rig:
    """testclient <-> [proxy_client ... tunnel ... proxy_upstream] <-> testupstream."""

    path: str
    client: trio.SocketStream
    upstream: trio.SocketStream
    proxy_client: trio.SocketStream
    proxy_upstream: trio.SocketStream
    stats: TunnelStats = field(default_factory=TunnelStats)
    done: trio.Event = field(default_factory=trio.Event)

    def start(self, nursery: trio.Nursery, **kwargs: Any) -> None:
        """Run the tunnel in the background; `done` is set when it returns."""
        kwargs.setdefault("idle_timeout", GUARD)

        async def go() -> None:
            await run_tunnel(
                self.proxy_client,
                self.proxy_upstream,
                stats=self.stats,
                allow_splice=self.path == "splice",
                **kwargs,
            )
            self.done.set()

        nursery.start_soon(go)

    def set_buffers(self, size: int) -> None:
        """Pin kernel socket buffers so back-pressure bounds do not depend on autotuning."""
        for stream in (self.client, self.proxy_client, self.proxy_upstream, self.upstream):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for the tests about timeouts: it jumps ahead only once every task has
    waited (real) 10 ms with nothing to do, so bytes in flight on loopback land first."""
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture(params=["splice", "portable"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    if request.param == "splice" and not hasattr(os, "splice"):
        pytest.skip("os.splice is Linux-only")
    client, proxy_client = await tcp_pair()
    proxy_upstream, upstream = await tcp_pair()
    r = Rig(request.param, client, upstream, proxy_client, proxy_upstream)
    yield r
    for stream in (client, upstream, proxy_client, proxy_upstream):
        await trio.aclose_forcefully(stream)
    # The parametrization must not silently test the same path twice.
    assert r.stats.path == r.path


async def send_then_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    view = memoryview(data)
    for off in range(0, len(data), 256 * 1024):
        await stream.send_all(view[off : off + 256 * 1024])
    await stream.send_eof()


async def read_to_eof(stream: trio.abc.ReceiveStream) -> tuple[int, str]:
    """Read until EOF; return (byte count, sha256 hex)."""
    digest, count = hashlib.sha256(), 0
    while chunk := await stream.receive_some(256 * 1024):
        digest.update(chunk)
        count += len(chunk)
    return count, digest.hexdigest()


async def read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- behaviour on real loopback sockets, both paths -----------------------------------------


async def test_bulk_both_ways_at_once(rig: Rig) -> None:
    size = 32 * MiB
    up_data, down_data = os.urandom(size), os.urandom(size)
    seen: dict[Direction, int] = {"up": 0, "down": 0}
    got: dict[str, tuple[int, str]] = {}

    def on_bytes(direction: Direction, n: int) -> None:
        seen[direction] += n

    async def collect(key: str, stream: trio.abc.ReceiveStream) -> None:
        got[key] = await read_to_eof(stream)

    started = trio.current_time()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            rig.start(nursery, on_bytes=on_bytes)
            nursery.start_soon(send_then_eof, rig.client, up_data)
            nursery.start_soon(send_then_eof, rig.upstream, down_data)
            nursery.start_soon(collect, "up", rig.upstream)
            nursery.start_soon(collect, "down", rig.client)
    elapsed = trio.current_time() - started

    assert got["up"] == (size, sha(up_data))
    assert got["down"] == (size, sha(down_data))
    assert rig.stats.bytes_up == rig.stats.bytes_down == size
    assert seen == {"up": size, "down": size}
    assert rig.stats.first_close in ("client", "upstream")
    assert rig.stats.path == rig.path
    print(f"\n[{rig.path}] 2 x 32 MiB in {elapsed:.2f}s = {2 * size / MiB / elapsed:.0f} MiB/s")


@pytest.mark.parametrize("first", ["client", "upstream"])
async def test_half_close_keeps_other_way_open(rig: Rig, first: str) -> None:
    closer, peer = (rig.client, rig.upstream) if first == "client" else (rig.upstream, rig.client)
    request, reply = os.urandom(300_000), os.urandom(200_000)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            rig.start(nursery)
            await send_then_eof(closer, request)
            # Everything arrives, then EOF, and the other way still works (golang/go#35892).
            assert await read_to_eof(peer) == (len(request), sha(request))
            await peer.send_all(reply)
            assert await read_exact(closer, len(reply)) == reply
            assert not rig.done.is_set()
            await peer.aclose()
            assert await closer.receive_some(1) == b""
            await rig.done.wait()
    assert rig.stats.first_close == first
    assert (rig.stats.bytes_up, rig.stats.bytes_down) == (
        (len(request), len(reply)) if first == "client" else (len(reply), len(request))
    )


async def test_slow_reader_holds_back_writer(rig: Rig) -> None:
    rig.set_buffers(128 * 1024)
    total, chunk = 24 * MiB, 64 * 1024
    data = os.urandom(total)
    written = 0

    async def writer() -> None:
        nonlocal written
        view = memoryview(data)
        for off in range(0, total, chunk):
            await rig.client.send_all(view[off : off + chunk])
            written = off + chunk
        await rig.client.send_eof()

    tracemalloc.start()
    try:
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                rig.start(nursery)
                nursery.start_soon(writer)
                # The upstream reads nothing until the writer has stalled: every task waits
                # (on a full socket buffer) and no I/O is ready for 0.1 s.
                await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                # Kernel buffers (4 sockets, pinned above) plus one tunnel buffer: well under this.
                assert 0 < written <= 8 * MiB
                assert peak < 4 * MiB, f"Python allocations peaked at {peak} bytes"
                assert await read_to_eof(rig.upstream) == (total, sha(data))
                await rig.upstream.send_eof()
    finally:
        tracemalloc.stop()
    assert rig.stats.bytes_up == total
    assert rig.stats.first_close == "client"


async def test_idle_timeout_closes_both_ends(rig: Rig, clock: trio.testing.MockClock) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            rig.start(nursery, idle_timeout=0.3)
            assert await rig.client.receive_some(1) == b""
            assert await rig.upstream.receive_some(1) == b""
            await rig.done.wait()
    assert rig.stats.first_close == "idle"
    assert rig.stats.duration >= 0.3


async def test_traffic_either_way_defers_idle(rig: Rig, clock: trio.testing.MockClock) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            rig.start(nursery, idle_timeout=0.5)
            for i in range(10):  # 1 s of (virtual) time, a byte every 0.1 s, alternating ways
                src, dst = (rig.client, rig.upstream) if i % 2 else (rig.upstream, rig.client)
                await src.send_all(b"x")
                assert await read_exact(dst, 1) == b"x"
                await trio.sleep(0.1)
            assert not rig.done.is_set()
            await rig.client.send_eof()
            await rig.upstream.send_eof()
            await rig.done.wait()
    assert rig.stats.first_close in ("client", "upstream")
    assert (rig.stats.bytes_up, rig.stats.bytes_down) == (5, 5)


@pytest.mark.parametrize("streaming", [False, True], ids=["quiet", "streaming"])
@pytest.mark.parametrize("side", ["client", "upstream"])
async def test_reset_ends_tunnel(rig: Rig, side: str, streaming: bool) -> None:
    resetter, other = (rig.client, rig.upstream) if side == "client" else (rig.upstream, rig.client)

    async def stream_forever() -> None:
        # Toward the resetter, so the tunnel also meets the reset as EPIPE/ECONNRESET on write.
        blob = bytes(64 * 1024)
        try:
            while True:
                await other.send_all(blob)
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            rig.start(nursery)
            await other.send_all(b"hi")
            assert await read_exact(resetter, 2) == b"hi"
            if streaming:
                nursery.start_soon(stream_forever)
                # Until the stream has filled every buffer towards the resetter: the tunnel
                # then waits to write to it, and meets the reset there.
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await resetter.aclose()
            await rig.done.wait()  # run_tunnel returned: no exception escaped
            if not streaming:
                assert await other.receive_some(1) == b""
    assert rig.stats.first_close == "error"


async def test_outside_cancel_closes_both_and_keeps_stats(rig: Rig) -> None:
    reached = False
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:

                async def drive() -> None:
                    await rig.client.send_all(b"ping")
                    assert await read_exact(rig.upstream, 4) == b"ping"
                    await rig.upstream.send_all(b"pong!")
                    assert await read_exact(rig.client, 5) == b"pong!"
                    scope.cancel()

                nursery.start_soon(drive)
                await run_tunnel(
                    rig.proxy_client,
                    rig.proxy_upstream,
                    idle_timeout=GUARD,
                    stats=rig.stats,
                    allow_splice=rig.path == "splice",
                )
                reached = True
        assert await rig.client.receive_some(1) == b""
        assert await rig.upstream.receive_some(1) == b""
    assert scope.cancelled_caught
    assert not reached
    assert rig.stats.first_close == "cancelled"
    assert (rig.stats.bytes_up, rig.stats.bytes_down) == (4, 5)
    assert rig.stats.duration > 0


async def test_busy_tunnel_still_yields(rig: Rig) -> None:
    """A transfer that never has to wait must still let other tasks run now and then."""
    backlog = 2 * MiB
    for stream in (rig.proxy_client, rig.upstream):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    ticks = 0
    ticks_seen: set[int] = set()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    with trio.fail_after(GUARD):
        await rig.client.send_all(bytes(backlog))  # queued in the kernel before the tunnel runs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            rig.start(nursery, on_bytes=lambda direction, n: ticks_seen.add(ticks))
            assert await read_exact(rig.upstream, backlog) == bytes(backlog)
            nursery.cancel_scope.cancel()
    # If the loop never yielded, every callback would see the same tick count.
    assert len(ticks_seen) >= 4


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_no_fds_held_when_idle_or_done(rig: Rig) -> None:
    before = open_fds()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            rig.start(nursery)
            await trio.testing.wait_all_tasks_blocked()
            assert open_fds() == before  # an idle tunnel pins no pipe
            await rig.client.send_all(b"abc")
            assert await read_exact(rig.upstream, 3) == b"abc"
            await trio.testing.wait_all_tasks_blocked()
            assert open_fds() == before  # a quiet one gives its pipe back
            await rig.client.send_eof()
            await rig.upstream.send_eof()
            await rig.done.wait()
    # The tunnel closed its two sockets (shared with the fixture) and nothing else is left.
    assert open_fds() == before - 2


# --- portable path over in-memory streams ----------------------------------------------------


class NoEofStream(trio.abc.Stream):
    """A stream that cannot half-close, like trio.SSLStream."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_lockstep_back_pressure_one_buffer_ahead() -> None:
    client, proxy_client = trio.testing.lockstep_stream_pair()
    proxy_upstream, upstream = trio.testing.lockstep_stream_pair()
    buffer_size, chunk, count = 32 * 1024, 16 * 1024, 64
    data = os.urandom(chunk * count)
    written = 0
    stats = TunnelStats()

    async def writer() -> None:
        nonlocal written
        for off in range(0, len(data), chunk):
            await client.send_all(data[off : off + chunk])
            written = off + chunk
        await client.aclose()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_tunnel(
                    proxy_client,
                    proxy_upstream,
                    idle_timeout=GUARD,
                    buffer_size=buffer_size,
                    stats=stats,
                )
            )
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert 0 < written <= buffer_size  # the tunnel read one buffer, then waited
            assert await read_to_eof(upstream) == (len(data), sha(data))
            await upstream.aclose()
    assert stats.path == "portable"
    assert stats.bytes_up == len(data)
    assert stats.first_close == "client"


async def test_memory_streams_half_close_and_path() -> None:
    client, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, upstream = trio.testing.memory_stream_pair()
    stats = TunnelStats()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_tunnel(proxy_client, proxy_upstream, idle_timeout=GUARD, stats=stats)
            )
            await upstream.send_all(b"hello")
            await upstream.send_eof()
            assert await read_to_eof(client) == (5, sha(b"hello"))
            await client.send_all(b"still open")
            assert await read_exact(upstream, 10) == b"still open"
            await client.send_eof()
            assert await upstream.receive_some(1) == b""
    assert stats.path == "portable"  # allow_splice is moot for non-socket streams
    assert stats.first_close == "upstream"
    assert (stats.bytes_up, stats.bytes_down) == (10, 5)


async def test_eof_to_a_stream_that_cannot_half_close_ends_the_tunnel() -> None:
    """An EOF that cannot be passed on (TLS) closes both sides cleanly (golang/go#72140).

    Otherwise the TLS peer would wait for an end that never comes until tunnel_idle.
    """
    client, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, upstream = trio.testing.memory_stream_pair()
    stats = TunnelStats()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_tunnel(
                    proxy_client, NoEofStream(proxy_upstream), idle_timeout=GUARD, stats=stats
                )
            )
            await client.send_all(b"last words")
            await client.send_eof()
            assert await read_exact(upstream, 10) == b"last words"
            assert await upstream.receive_some(1) == b""  # closed, not left waiting
            assert await client.receive_some(1) == b""
    assert stats.first_close == "client"


async def test_on_bytes_exception_closes_streams() -> None:
    client, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, upstream = trio.testing.memory_stream_pair()

    def boom(direction: Direction, n: int) -> None:
        raise RuntimeError("metrics broke")

    stats = TunnelStats()
    with trio.fail_after(GUARD), pytest.RaisesGroup(RuntimeError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_tunnel(
                    proxy_client, proxy_upstream, idle_timeout=GUARD, on_bytes=boom, stats=stats
                )
            )
            await client.send_all(b"x")
    assert stats.first_close == "error"
    assert await client.receive_some(1) == b""
    assert await upstream.receive_some(2) == b"x"


# --- planned ends: lifetime and spread drain (rule 13) ---------------------------------------


@pytest.mark.parametrize("busy", [False, True], ids=["quiet", "busy"])
async def test_ending_closes_a_tunnel_when_due_with_its_reason(
    rig: Rig, busy: bool, clock: trio.testing.MockClock
) -> None:
    """Both paths end at an `Ending`'s deadline, quiet or moving bytes, and report its reason."""
    ending = Ending()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            ending.at(trio.current_time() + 0.3, "lifetime")
            rig.start(nursery, ending=ending)
            if busy:
                for _ in range(5):
                    await rig.client.send_all(b"x" * 1000)
                    assert await read_exact(rig.upstream, 1000) == b"x" * 1000
            await read_to_eof(rig.client)  # returns at the EOF the end sends
            assert await rig.upstream.receive_some(1) == b""
            await rig.done.wait()
    assert rig.stats.first_close == "lifetime"
    assert rig.stats.duration >= 0.3


async def test_ending_can_be_brought_forward_while_running(
    rig: Rig, clock: trio.testing.MockClock
) -> None:
    """A drain moves a running tunnel's end earlier; a later plan does not postpone it."""
    ending = Ending()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            ending.at(trio.current_time() + GUARD, "lifetime")
            rig.start(nursery, ending=ending)
            await trio.testing.wait_all_tasks_blocked()  # the tunnel runs, waiting for bytes
            ending.at(trio.current_time() + 0.1, "drain")
            ending.at(trio.current_time() + GUARD, "lifetime")
            await rig.done.wait()
    assert rig.stats.first_close == "drain"
