"""The client-side stream stack conforms to trio's stream contract.

`PrefixedStream` replays bytes already read; the server puts it under TLS when a PROXY header
arrived in the same read as the start of the ClientHello. trio's generic checks run over both;
the prefix-specific edge cases the generic checks cannot reach are tested one by one.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl

import pytest
import trio
from trio.testing import (
    assert_checkpoints,
    check_half_closeable_stream,
    check_two_way_stream,
    lockstep_stream_pair,
    memory_stream_pair,
)

from tests.support.certs import write_pair
from tests.support.configs import listener, proxy_yaml
from tests.support.wire import proxy_v2_header
from upgradeproxy.config.loader import parse_config
from upgradeproxy.service.accept import open_client
from upgradeproxy.transport.streams import PrefixedStream
from upgradeproxy.transport.tls import server_tls_context

# --- PrefixedStream alone ----------------------------------------------------------------


async def _prefixed_memory_pair() -> tuple[PrefixedStream, PrefixedStream]:
    a, b = memory_stream_pair()
    return PrefixedStream(a, b""), PrefixedStream(b, b"")


async def _prefixed_clogged_pair() -> tuple[PrefixedStream, PrefixedStream]:
    a, b = lockstep_stream_pair()
    return PrefixedStream(a, b""), PrefixedStream(b, b"")


async def _prefixed_socket_pair(*, clogged: bool = False) -> tuple[PrefixedStream, PrefixedStream]:
    a, b = socket.socketpair()
    for sock in (a, b) if clogged else ():
        # Fill both kernel buffers, so the next send_all blocks until the peer reads.
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.send(b"x" * 65536)
    return (
        PrefixedStream(trio.SocketStream(trio.socket.from_stdlib_socket(a)), b""),
        PrefixedStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), b""),
    )


async def test_prefixed_stream_over_memory_is_a_two_way_stream() -> None:
    await check_two_way_stream(_prefixed_memory_pair, _prefixed_clogged_pair)


async def test_prefixed_stream_over_memory_is_a_half_closeable_stream() -> None:
    # No clogged maker: trio's lockstep StapledStream itself answers send_eof during a blocked
    # send_all with Closed, not Busy, so those checks would test trio's test helper.
    await check_half_closeable_stream(_prefixed_memory_pair, None)


async def test_prefixed_stream_over_sockets_is_a_half_closeable_stream() -> None:
    await check_half_closeable_stream(
        _prefixed_socket_pair, functools.partial(_prefixed_socket_pair, clogged=True)
    )


async def _with_prefix(prefix: bytes) -> tuple[trio.abc.Stream, PrefixedStream]:
    a, b = memory_stream_pair()
    return a, PrefixedStream(b, prefix)


async def test_prefix_is_replayed_in_order_before_the_stream() -> None:
    sender, stream = await _with_prefix(b"abcde")
    await sender.send_all(b"fg")
    assert await stream.receive_some(2) == b"ab"
    assert await stream.receive_some() == b"cde"
    assert await stream.receive_some(10) == b"fg"


@pytest.mark.parametrize(
    ("max_bytes", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError)],
)
async def test_bad_max_bytes_raises_and_keeps_the_prefix(max_bytes, error) -> None:
    """0 must not read as end of stream, -1 must not drop a byte: both are caller errors."""
    _, stream = await _with_prefix(b"xyz")
    with pytest.raises(error):
        await stream.receive_some(max_bytes)
    assert await stream.receive_some(10) == b"xyz"


async def test_receive_from_the_prefix_is_a_checkpoint() -> None:
    _, stream = await _with_prefix(b"x")
    with assert_checkpoints():
        assert await stream.receive_some(1) == b"x"


async def test_cancelled_receive_loses_no_prefix_bytes() -> None:
    _, stream = await _with_prefix(b"hello")
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive_some(3)
    assert scope.cancelled_caught
    assert await stream.receive_some(10) == b"hello"


async def test_closed_stream_raises_instead_of_replaying() -> None:
    _, stream = await _with_prefix(b"left over")
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some(10)


async def test_send_eof_reaches_the_peer_and_the_prefix_still_reads() -> None:
    peer, stream = await _with_prefix(b"pre")
    await stream.send_eof()
    assert await peer.receive_some(10) == b""
    await peer.send_all(b"more")
    assert await stream.receive_some(10) == b"pre"
    assert await stream.receive_some(10) == b"more"


# --- PROXY header + TLS, as the server opens a client connection -------------------------

V1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\n"
V2 = proxy_v2_header("198.51.100.9")


class _HeaderFirst(trio.abc.Stream):
    """A client transport whose first write is the PROXY header and the ClientHello together,
    so the server's first read holds TLS bytes past the header (the prefix under TLS)."""

    def __init__(self, stream: trio.abc.Stream, header: bytes) -> None:
        self.stream = stream
        self.header = header

    async def send_all(self, data) -> None:
        data, self.header = self.header + bytes(data), b""
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
def server_ctx(ca, tmp_path) -> ssl.SSLContext:
    """The listener's TLS context, built from a config exactly as the server builds it."""
    cert = ca.issue_cert("localhost")
    cert_path, key_path = write_pair(cert, tmp_path, "cert")
    tls = {"cert": str(cert_path), "key": str(key_path)}
    config = parse_config(proxy_yaml(1, listen=listener(proxy_protocol=True, tls=tls)))
    ctx = server_tls_context(config.listeners[0].tls)
    assert ctx is not None
    return ctx


@pytest.mark.parametrize(
    ("header", "source"),
    [pytest.param(V1, "203.0.113.7", id="v1"), pytest.param(V2, "198.51.100.9", id="v2")],
)
async def test_proxy_header_then_tls_is_a_two_way_stream(ca, server_ctx, header, source) -> None:
    """TLS cannot half-close, so the two-way checks; the TLS layer reads the prefix first."""
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def stream_maker() -> tuple[trio.SSLStream[trio.abc.Stream], trio.abc.Stream]:
        a, b = memory_stream_pair()
        client = trio.SSLStream(_HeaderFirst(a, header), client_ctx, server_hostname="localhost")
        opened = []

        async def open_server_side() -> None:
            opened.append(await open_client(b, "127.0.0.1", proxy_protocol=True, tls=server_ctx))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(open_server_side)
        assert opened[0] is not None
        server, peer = opened[0]
        assert (peer.ip, peer.tls, peer.leftover) == (source, True, b"")
        assert isinstance(server, trio.SSLStream)
        assert isinstance(server.transport_stream, PrefixedStream)  # the prefix path ran
        return client, server

    await check_two_way_stream(stream_maker, None)


async def test_tls_without_a_proxy_header_is_a_two_way_stream(ca, server_ctx) -> None:
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def stream_maker() -> tuple[trio.SSLStream[trio.abc.Stream], trio.abc.Stream]:
        a, b = memory_stream_pair()
        client = trio.SSLStream(a, client_ctx, server_hostname="localhost")
        opened = []

        async def open_server_side() -> None:
            opened.append(await open_client(b, "192.0.2.5", proxy_protocol=False, tls=server_ctx))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(open_server_side)
        server, peer = opened[0]
        assert (peer.ip, peer.tls) == ("192.0.2.5", True)
        return client, server

    await check_two_way_stream(stream_maker, None)


async def test_proxy_header_without_tls_hands_the_leftover_bytes_to_http() -> None:
    a, b = memory_stream_pair()
    await a.send_all(V1 + b"GET / HTTP/1.1\r\n")
    opened = await open_client(b, "127.0.0.1", proxy_protocol=True, tls=None)
    assert opened is not None
    stream, peer = opened
    assert stream is b
    assert (peer.ip, peer.tls, peer.leftover) == ("203.0.113.7", False, b"GET / HTTP/1.1\r\n")


async def test_a_failed_handshake_behind_a_proxy_header_drops_the_connection(server_ctx) -> None:
    a, b = memory_stream_pair()
    await a.send_all(V2 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await a.send_eof()
    assert await open_client(b, "127.0.0.1", proxy_protocol=True, tls=server_ctx) is None
